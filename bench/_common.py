"""Shared helpers of the benchmark scripts: data generation and result reporting."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()
"""When the benchmark script began (after interpreter start, before heavy imports)."""


def make_w1(path: Path, records: int) -> Path:
    """Workload W1: ``{"id": i, "key": "k<i mod 10000>", "v": i mod 97}`` per line."""
    if path.exists() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            if sum(1 for _ in f) == records:
                return path
    path.parent.mkdir(parents=True, exist_ok=True)
    step = 100_000
    with open(path, "w") as f:
        for start in range(0, records, step):
            f.write("".join(
                f'{{"id": {i}, "key": "k{i % 10000}", "v": {i % 97}}}\n'
                for i in range(start, min(records, start + step))))
    return path


def report(**fields: object) -> None:
    """Print one JSON result line with peak memory, for the driver to collect."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    fields["maxrss_mb"] = usage.ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    fields["child_cpu_s"] = children.ru_utime + children.ru_stime
    fields["cpu_s"] = usage.ru_utime + usage.ru_stime + fields["child_cpu_s"]
    """CPU time of the whole process (every thread; start-up included) and of the child
    processes it waited for (resumeflow's compactor process)."""
    fields["import_s"] = fields.get("import_s", 0.0)
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()
