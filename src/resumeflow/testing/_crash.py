"""The exception that stands for a process dying at an instant."""

from __future__ import annotations

__all__ = ["SimulatedCrash"]


class SimulatedCrash(BaseException):
    """The task's process died here.

    A ``BaseException``, like ``KeyboardInterrupt``, so that no ``except Exception`` in the
    runtime or in user code mistakes it for a failure to handle: it unwinds the task as a
    kill would, and whatever the task held in memory is dropped with it.
    """
