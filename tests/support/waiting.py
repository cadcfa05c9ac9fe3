"""Bounded waiting: tests poll real clusters and servers, and every poll ends by time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T], timeout: float, every: float = 0.25) -> T:
    """Poll ``check`` until it returns something truthy (returned); AssertionError after
    ``timeout`` seconds, naming what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)
