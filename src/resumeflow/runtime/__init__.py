"""The runtime: tasks, the commit protocol, recovery and crash points."""

from .._faults import CRASH_POINTS, crash_point
from ._config import RunConfig
from ._runtime import Progress, RunSummary, Runtime, run
from ._task import Recovery, TaskRunner

__all__ = [
    "CRASH_POINTS",
    "Progress",
    "Recovery",
    "RunConfig",
    "RunSummary",
    "Runtime",
    "TaskRunner",
    "crash_point",
    "run",
]
