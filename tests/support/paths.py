"""Where things are: the checkout, the shared data set and the installed ``medray`` command."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# PneumoniaMNIST (MedMNIST v2), kept beside the checkout rather than in it
DATA = ROOT.parent / "shared" / "data" / "pneumoniamnist.npz"
# the console script of the venv running the tests, not whatever `medray` is on PATH
MEDRAY = str(Path(sys.executable).parent / "medray")
