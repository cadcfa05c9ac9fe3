"""One error hierarchy for medray.

``InputError`` covers bad input or config: retrying never helps, the message names the fix.
``InfraError`` covers infrastructure (storage, cluster): it may pass, so callers may retry.
The CLI maps ``InputError`` to exit code 2 before submission and any failure of a job to 1.
"""

from __future__ import annotations


class MedrayError(Exception):
    """Base class of every error medray raises on purpose."""

    retryable = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self):  # pickles cleanly across Ray processes
        return (self.__class__, (self.message,))


class InputError(MedrayError):
    """Bad input or configuration; never retried."""


class ConfigError(InputError):
    """A job spec, flag or environment value is wrong."""


class NotFoundError(InputError):
    """A dataset, model, run or file that was named does not exist."""


class ImageError(InputError):
    """One image cannot be used. ``kind`` is a short machine-readable reason."""

    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):
        return (self.__class__, (self.message, self.kind))


class InfraError(MedrayError):
    """Storage or cluster trouble that may pass; safe to retry."""

    retryable = True


class PermanentStorageError(MedrayError):
    """Storage refuses for good (access denied, missing bucket): fail fast."""


class JobFailedError(MedrayError):
    """A submitted job ended in failure."""
