"""The public API is exactly what ``__all__`` lists: adding or removing a name is a decision."""

from __future__ import annotations

import importlib

import pytest

import resumeflow as rf

PUBLIC = {
    "resumeflow": [
        "Flow", "ResumeflowError", "RunConfig", "RunSummary", "Runtime", "SQLiteStore",
        "__version__", "checkpoint", "errors", "run", "sinks", "sources",
    ],
    "resumeflow.sources": [
        "Batch", "JsonLines", "JsonLinesDir", "KafkaRecord", "KafkaSource", "Source",
        "SourceReader",
    ],
    "resumeflow.sinks": [
        "Guarantee", "JsonLinesSink", "KafkaSink", "Precommit", "SQLiteTable", "Sink",
        "SinkContext", "SinkWriter", "Stdout",
    ],
    "resumeflow.checkpoint": [
        "GENESIS_DIGEST", "SCHEMA_VERSION", "CommitRecord", "OpenedTask", "SQLiteStore",
        "StagedEntry", "Store", "TaskStatus", "decode_record", "make_record",
    ],
    "resumeflow.errors": [
        "BadRecordError", "ClosedError", "ConfigurationError", "CorruptCheckpointError",
        "DataError", "FencedError", "InternalError", "PoisonRecordError", "ResumeflowError",
        "UnavailableError", "UsageError", "invariant",
    ],
    "resumeflow.runtime": [
        "CRASH_POINTS", "HandsOver", "Membership", "Progress", "Recovery", "ReleaseHandler",
        "RunConfig", "RunSummary", "Runtime", "StaticMembership", "TaskRunner",
        "ThrottledMembership", "crash_point", "run",
    ],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_all_is_pinned(module: str) -> None:
    """Each public package's ``__all__`` is exactly the pinned list of names."""
    mod = importlib.import_module(module)
    assert sorted(mod.__all__) == sorted(PUBLIC[module])
    assert len(set(mod.__all__)) == len(mod.__all__), "a name is listed twice"


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_every_listed_name_exists(module: str) -> None:
    """Every name in ``__all__`` resolves, so ``from module import *`` never fails."""
    mod = importlib.import_module(module)
    missing = [name for name in mod.__all__ if not hasattr(mod, name)]
    assert missing == []


def test_top_level_reexports_are_the_implementations() -> None:
    """Top-level names are the same objects as in their sub-packages (one class, one name)."""
    assert rf.SQLiteStore is rf.checkpoint.SQLiteStore
    assert rf.ResumeflowError is rf.errors.ResumeflowError
    assert rf.sources.JsonLines.__module__.startswith("resumeflow.sources")
    assert rf.sinks.JsonLinesSink.__module__.startswith("resumeflow.sinks")


def test_every_error_derives_from_the_root() -> None:
    """Every exception class resumeflow raises on purpose is a ``ResumeflowError``."""
    errors = [getattr(rf.errors, n) for n in rf.errors.__all__ if n[0].isupper()]
    assert errors and all(issubclass(e, rf.ResumeflowError) for e in errors)
