"""resumeflow: stream processing that resumes exactly where it left off.

A flow reads partitioned sources, keeps keyed state and writes sinks; every task checkpoints
its positions, its state delta and its sink transaction with one atomic commit, so a crash
anywhere replays at most the records read since the last commit, and exactly-once sinks hold
each record's effect once.

    import resumeflow as rf
    flow = rf.Flow("orders")
    (flow.source(rf.sources.JsonLines("events.jsonl"))
         .key_by(lambda e: e["customer"])
         .reduce(lambda total, e: total + e["amount"], initial=0)
         .sink(rf.sinks.SQLiteTable("out.db", table="totals")))
    rf.run(flow, "resumeflow.db")
"""

from . import checkpoint, errors, sinks, sources
from .checkpoint import SQLiteStore
from .errors import ResumeflowError
from .flow import Flow
from .runtime import RunConfig, RunSummary, Runtime, run

__version__ = "0.1.0"

__all__ = [
    "Flow",
    "ResumeflowError",
    "RunConfig",
    "RunSummary",
    "Runtime",
    "SQLiteStore",
    "__version__",
    "checkpoint",
    "errors",
    "run",
    "sinks",
    "sources",
]
