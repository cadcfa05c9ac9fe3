"""`make demo`: the main path on embedded defaults, through the real CLI.

Starts the embedded S3 lake and a local Ray cluster (unless already running), stages
PneumoniaMNIST, trains, scores the test split, prints the report, then stops what it started.
Each command shows what a user sees (progress, then its summary); the demo ends with the
``file://`` link of the report's local copy.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "pneumoniamnist.npz"
MEDRAY = str(Path(sys.executable).parent / "medray")


def medray(*args: str) -> None:
    print(f"\n$ medray {' '.join(args)}", flush=True)
    proc = subprocess.run([MEDRAY, *args], check=False)
    if proc.returncode != 0:
        raise SystemExit(f"`medray {' '.join(args)}` failed with exit code {proc.returncode}")


def main() -> int:
    if not DATA.exists():
        raise SystemExit(f"demo data not found: {DATA}")
    from medray.cluster.infra import env, ray_local, s3server
    from medray.cluster.report.local_copy import HTML_NAME
    from medray.jobs import sdk

    started_lake = not s3server.status().get("running")
    started_cluster = not ray_local.status().get("running")
    t0 = time.monotonic()
    try:
        medray("lake", "up")
        medray("cluster", "up")
        os.environ.pop(env.LAKE, None)  # the embedded S3 lake is the default lake
        medray("stage", str(DATA), "--dataset", "pneumoniamnist", "--image-size", "28",
               "--label-names", "normal,pneumonia")
        medray("train", "--dataset", "pneumoniamnist", "--model", "pneumonia-cnn")
        # the demo names its run, so that it can point at the report afterwards
        run_id = f"demo-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
        medray("score", "--dataset", "pneumoniamnist", "--model", "pneumonia-cnn",
               "--split", "test", "--run-id", run_id)
        medray("report", run_id)
        print(f"\ndemo finished in {time.monotonic() - t0:.0f}s; the report, one click away:\n"
              f"  {(sdk.report_dir(run_id) / HTML_NAME).as_uri()}")
    finally:
        if started_cluster:
            medray("cluster", "down")
        if started_lake:
            medray("lake", "down")
            print("the lake's data stays under MEDRAY_HOME; `medray lake up` serves it again")
    return 0


if __name__ == "__main__":
    sys.exit(main())
