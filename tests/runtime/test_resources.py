"""A run releases what it opened, so a long-lived process can run flows again and again."""

from __future__ import annotations

import os
from typing import Any

import resumeflow as rf


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_repeated_runs_leak_no_file_descriptors(work: Any) -> None:
    """Every ``run()`` closes its files, store and side files when it returns."""
    events = work.events(200)
    rf.run(work.flow(events), work.store)  # warm up imports and caches
    before = open_fds()
    for _ in range(10):
        events.append(10)
        rf.run(work.flow(events), work.store)
    assert open_fds() == before
    assert work.output("jsonl") == events.running_totals()
