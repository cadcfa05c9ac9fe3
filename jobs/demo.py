"""`make demo`: the main path on embedded defaults, through the real CLI.

Starts the embedded S3 lake and a local Ray cluster (unless already running), stages
PneumoniaMNIST, trains, scores the test split, prints the report, then stops what it started.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "pneumoniamnist.npz"
MEDRAY = str(Path(sys.executable).parent / "medray")


def medray(*args: str, capture_json: bool = False) -> dict | None:
    cmd = [MEDRAY, *args] + (["--json"] if capture_json else [])
    print(f"\n$ medray {' '.join(args)}", flush=True)
    proc = subprocess.run(
        cmd, stdout=subprocess.PIPE if capture_json else None, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"`medray {' '.join(args)}` failed with exit code {proc.returncode}")
    if capture_json:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    return None


def main() -> int:
    if not DATA.exists():
        raise SystemExit(f"demo data not found: {DATA}")
    from medray.cluster.infra import env, ray_local, s3server

    started_lake = not s3server.status().get("running")
    started_cluster = not ray_local.status().get("running")
    t0 = time.monotonic()
    try:
        medray("lake", "up")
        medray("cluster", "up")
        os.environ.pop(env.LAKE, None)  # the embedded S3 lake is the default lake
        staged = medray(
            "stage",
            str(DATA),
            "--dataset",
            "pneumoniamnist",
            "--image-size",
            "28",
            "--label-names",
            "normal,pneumonia",
            capture_json=True,
        )
        assert staged
        print(
            f"staged {staged['images']} images ({staged['duplicates']} duplicates) into "
            f"{staged['uri']}"
        )
        trained = medray(
            "train", "--dataset", "pneumoniamnist", "--model", "pneumonia-cnn", capture_json=True
        )
        assert trained
        print(
            f"registered {trained['model']}:{trained['version']}, validation mean AUROC "
            f"{trained['metrics']['val_mean_auroc']:.4f}"
        )
        scored = medray(
            "score",
            "--dataset",
            "pneumoniamnist",
            "--model",
            f"pneumonia-cnn:{trained['version']}",
            "--split",
            "test",
            capture_json=True,
        )
        assert scored
        medray("report", scored["run_id"])
        print(f"\npredictions: {scored['predictions_uri']}\nerrors:      {scored['errors_uri']}")
        print(f"demo finished in {time.monotonic() - t0:.0f}s")
    finally:
        if started_cluster:
            medray("cluster", "down")
        if started_lake:
            medray("lake", "down")
            print("the lake's data stays under MEDRAY_HOME; `medray lake up` serves it again")
    return 0


if __name__ == "__main__":
    sys.exit(main())
