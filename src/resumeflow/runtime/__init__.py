"""The runtime: tasks, the commit protocol, recovery, crash points and membership."""

from .._faults import CRASH_POINTS, crash_point
from ._config import RunConfig
from ._membership import (
    HandsOver,
    Membership,
    ReleaseHandler,
    StaticMembership,
    ThrottledMembership,
)
from ._runtime import Progress, RunSummary, Runtime, run
from ._task import Recovery, TaskRunner

__all__ = [
    "CRASH_POINTS",
    "HandsOver",
    "Membership",
    "Progress",
    "Recovery",
    "ReleaseHandler",
    "RunConfig",
    "RunSummary",
    "Runtime",
    "StaticMembership",
    "TaskRunner",
    "ThrottledMembership",
    "crash_point",
    "run",
]
