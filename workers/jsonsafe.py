"""JSON that every reader accepts: NaN and infinities (not JSON) become null, tuples lists,
numpy scalars and arrays plain Python. The one home of this rule for results, reports and the
CLI's ``--json`` output."""

from __future__ import annotations

import math
from typing import Any


def json_safe(obj: Any) -> Any:
    if hasattr(obj, "tolist") and not isinstance(obj, str | bytes):  # numpy scalars and arrays
        obj = obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj
