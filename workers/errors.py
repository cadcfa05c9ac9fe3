"""One error hierarchy for medray.

``InputError`` covers bad input or config: retrying never helps, the message names the fix.
``InfraError`` covers infrastructure (storage, cluster): it may pass, so callers may retry.
Each class carries the exit code the CLI returns for it: 2 for bad input or config (whether
found before submission or inside a job), 1 for everything else.
"""

from __future__ import annotations

from typing import Any


class MedrayError(Exception):
    """Base class of every error medray raises on purpose."""

    retryable = False
    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:  # pickles cleanly across Ray processes
        return (self.__class__, (self.message,))


class InputError(MedrayError):
    """Bad input or configuration; never retried."""

    exit_code = 2


class ConfigError(InputError):
    """A job spec, flag or environment value is wrong."""


class NotFoundError(InputError):
    """A dataset, model, run or file that was named does not exist."""


class ImageError(InputError):
    """One image cannot be used. ``kind`` is a short machine-readable reason."""

    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (self.message, self.kind))


class InfraError(MedrayError):
    """Storage or cluster trouble that may pass; safe to retry."""

    retryable = True


class PermanentStorageError(MedrayError):
    """Storage refuses for good (access denied, missing bucket): fail fast."""


class JobFailedError(MedrayError):
    """A submitted job ended in failure; ``exit_code`` is the one the job reported (2 when it
    found bad input only on the cluster)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (self.message, self.exit_code))
