"""``import medray``: the notebook SDK (docs/notebooks.md).

    import medray
    mr = medray.connect(lake="s3://medray/lake")      # defaults: MEDRAY_LAKE, the local cluster
    ds = mr.stage("pneumoniamnist.npz", dataset="pneu", label_names=["normal", "pneumonia"])
    model = mr.train(dataset=ds, model="cnn", epochs=12)
    run = mr.score(dataset=ds, model=model, split="test", allow_cpu=True)
    run.predictions()                                  # a pandas DataFrame of the committed run

This folder installs as the top-level package ``medray`` (pyproject's package-dir), so the fixed
layout (jobs/ cluster/ workers/) gains no folder. Its names load on first use from
``medray.jobs.notebook``: importing ``medray`` (which every ``medray.workers`` import in a Ray
worker does first) costs nothing and loads neither Ray nor TensorFlow.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medray.jobs.notebook import Connection, Dataset, Job, Model, Report, Run, connect

__all__ = ["Connection", "Dataset", "Job", "Model", "Report", "Run", "connect"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("medray.jobs.notebook"), name)
    raise AttributeError(f"module 'medray' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
