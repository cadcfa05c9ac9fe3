"""What a job knows about itself besides its spec: handed whole to ``run(spec, lake, ctx)``."""

from __future__ import annotations

import getpass
from dataclasses import dataclass

from medray.cluster.infra import env


@dataclass(frozen=True)
class JobContext:
    job_id: str
    kind: str
    submitted_by: str
    submitted_at: str | None

    @classmethod
    def from_env(cls, kind: str) -> JobContext:
        """The context of the job this process runs, from the environment the CLI set."""
        return cls(
            job_id=env.get(env.JOB_ID, "local"),
            kind=kind,
            submitted_by=env.get(env.SUBMITTED_BY) or getpass.getuser(),
            submitted_at=env.get(env.SUBMITTED_AT) or None,
        )
