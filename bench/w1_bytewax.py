"""W1 on Bytewax 0.21 (benchmark only), with SQLite recovery at an interval or without."""

from __future__ import annotations

import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path

import bytewax.operators as op
import orjson
from _common import STARTED, report
from bytewax.connectors.files import FileSink, FileSource
from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import run_main


def _add(state: int | None, e: dict[str, int]) -> tuple[int, int]:
    total = (state or 0) + e["v"]
    return total, total


def main(src: Path, out: Path, interval_s: float | None) -> None:
    imported = time.perf_counter()
    flow = Dataflow("w1")
    lines = op.input("in", flow, FileSource(src))
    events = op.map("parse", lines, orjson.loads)
    keyed = op.key_on("key", events, lambda e: e["key"])
    sums = op.stateful_map("sum", keyed, _add)
    text = op.map("fmt", sums,
                  lambda kv: ("w1", orjson.dumps({"key": kv[0], "value": kv[1]}).decode()))
    op.output("out", text, FileSink(out))
    recovery = None
    epoch = None
    if interval_s is not None:
        db = out.parent / "bytewax-recovery"
        shutil.rmtree(db, ignore_errors=True)
        db.mkdir(parents=True)
        init_db_dir(db, 1)
        recovery = RecoveryConfig(db)
        epoch = timedelta(seconds=interval_s)
    run_main(flow, epoch_interval=epoch, recovery_config=recovery)
    with open(out, "rb") as f:
        n = sum(1 for _ in f)
    label = "Bytewax, no recovery" if interval_s is None else \
        f"Bytewax, SQLite recovery, {interval_s:g} s snapshots"
    report(contender=label, records=n, seconds=time.perf_counter() - imported,
           import_s=imported - STARTED)


if __name__ == "__main__":
    interval = None if sys.argv[3] == "none" else float(sys.argv[3])
    main(Path(sys.argv[1]), Path(sys.argv[2]), interval)
