"""Errors raised by resumeflow, split by who has to act.

Every message says what to do next. The tree::

    ResumeflowError
    ├── UsageError                 the caller must change something
    │   ├── ConfigurationError     bad option, unreadable file, store of a newer schema
    │   └── ClosedError            a runtime, task or store used after close
    ├── UnavailableError           the outside world failed; retryable (source, sink, store)
    ├── DataError                  the data is wrong; retrying will not help
    │   ├── PoisonRecordError      user code failed on one record max_attempts times
    │   ├── BadRecordError         a record could not be decoded (names source, partition, position)
    │   └── CorruptCheckpointError a commit record or state row failed its digest or decoder
    ├── FencedError                a newer epoch owns the task; this worker must stop
    └── InternalError              an invariant broke: a bug in resumeflow, please report it
"""

from __future__ import annotations

from typing import NoReturn

__all__ = [
    "BadRecordError",
    "ClosedError",
    "ConfigurationError",
    "CorruptCheckpointError",
    "DataError",
    "FencedError",
    "InternalError",
    "PoisonRecordError",
    "ResumeflowError",
    "UnavailableError",
    "UsageError",
    "invariant",
]


class ResumeflowError(Exception):
    """Root of every error resumeflow raises on purpose."""


class UsageError(ResumeflowError):
    """The caller must change something: configuration, arguments, or call order."""


class ConfigurationError(UsageError):
    """Configuration that cannot work; raised at start, before any record is read."""


class ClosedError(UsageError):
    """A runtime, task or store was used after it was closed."""


class UnavailableError(ResumeflowError):
    """A source, sink or store is unreachable or timed out; retrying may succeed."""


class DataError(ResumeflowError):
    """The data itself is wrong; retrying the same operation will fail the same way."""


class PoisonRecordError(DataError):
    """User code raised on one record on every attempt."""


class BadRecordError(DataError):
    """A record could not be decoded. The message names its source, partition and position."""

    def __init__(self, message: str, *, source: str, partition: str, position: object) -> None:
        super().__init__(
            f"{message} (source {source!r}, partition {partition!r}, position {position!r})"
        )
        self.source = source
        self.partition = partition
        self.position = position


class CorruptCheckpointError(DataError):
    """A commit record or state row failed its digest or decoder check."""


class FencedError(ResumeflowError):
    """Another worker took the task with a newer epoch; this worker must stop using it."""


class InternalError(ResumeflowError):
    """An invariant of resumeflow broke. This is a bug: please report it with the message."""


def invariant(condition: bool, message: str) -> None:
    """Check an invariant in a way that survives ``python -O`` (unlike ``assert``)."""
    if not condition:
        _fail(message)


def _fail(message: str) -> NoReturn:
    raise InternalError(f"invariant broken: {message}; this is a bug in resumeflow")
