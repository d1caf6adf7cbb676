"""W1 on resumeflow, exactly-once, at the default commit bound or with commits disabled."""

from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path

from _common import STARTED, report

import resumeflow as rf


def build(src: Path, out: Path) -> rf.Flow:
    flow = rf.Flow("w1")
    (flow.source(rf.sources.JsonLines(src))
         .key_by(lambda e: e["key"])
         .reduce(lambda total, e: total + e["v"], initial=0)
         .sink(rf.sinks.JsonLinesSink(out)))
    return flow


def main(src: Path, out: Path, mode: str) -> None:
    imported = time.perf_counter()
    store = out.parent / "rf-store.db"
    for leftover in out.parent.glob("rf-store.db*"):
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()
    out.unlink(missing_ok=True)
    if mode == "default":
        config = rf.RunConfig()
        label = "resumeflow, exactly-once, 100 ms / 100k commits"
    else:
        config = rf.RunConfig(replay_max_events=math.inf,
                              replay_max_seconds=math.inf)
        label = "resumeflow, commits disabled"
    summary = rf.run(build(src, out), store, config)
    report(contender=label, records=summary.records_in, seconds=time.perf_counter() - imported,
           import_s=imported - STARTED, commits=summary.commits,
           commit_p50_ms=summary.commit_p50_s * 1e3)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
