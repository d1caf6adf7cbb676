"""Named crash points in the commit protocol, for fault-injection tests.

Production code calls ``crash_point(name)`` between protocol steps; it does nothing unless a
hook is installed. ``RESUMEFLOW_CRASH_AT=name:n`` in the environment makes the process SIGKILL
itself at the n-th time it passes ``name`` (for tests with real processes); the simulator
installs an in-process hook instead.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["CRASH_POINTS", "crash_point", "install_from_env", "installed"]

CRASH_POINTS = (
    "batch.mid",
    "commit.before_precommit",
    "commit.after_precommit",
    "store.before_commit",
    "commit.after_store",
    "sink.finalize.partial",
    "commit.after_finalize",
)
"""Every crash point, in protocol order."""

_hook: Callable[[str], None] | None = None


def crash_point(name: str) -> None:
    """Give an installed fault hook the chance to crash here."""
    if _hook is not None:
        _hook(name)


@contextmanager
def installed(hook: Callable[[str], None]) -> Iterator[None]:
    """Install ``hook`` for the duration of the block."""
    global _hook
    previous, _hook = _hook, hook
    try:
        yield
    finally:
        _hook = previous


def install_from_env() -> None:
    """Honour ``RESUMEFLOW_CRASH_AT=name:n`` (SIGKILL at the n-th pass of ``name``)."""
    global _hook
    spec = os.environ.get("RESUMEFLOW_CRASH_AT")
    if not spec:
        return
    name, _, count = spec.partition(":")
    remaining = [int(count or 1)]

    def kill_at(point: str) -> None:
        if point == name:
            remaining[0] -= 1
            if remaining[0] <= 0:
                os.kill(os.getpid(), signal.SIGKILL)

    _hook = kill_at
