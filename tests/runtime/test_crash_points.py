"""A crash between any two protocol steps loses nothing and duplicates nothing.

Every named crash point of the commit protocol is hit, at several passes, with each kind of
exactly-once sink: a real process that SIGKILLs itself (``RESUMEFLOW_CRASH_AT``), and an
in-process variant whose hook raises a ``BaseException``. After the crashes the pipeline runs
to its end on the same store, and its output must equal the fault-free reference exactly.
The input holds malformed lines too, so the dead-letter sink (a JSON-lines sink, finalized
after each commit) is crashed and checked as well.
"""

from __future__ import annotations

from typing import Any

import pytest

import resumeflow as rf
from resumeflow._faults import installed
from resumeflow.cli._verify import verify_chain
from resumeflow.runtime import CRASH_POINTS

SINK_KINDS = ("jsonl", "sqlite-store", "sqlite-other")
REPLAY_MAX_EVENTS = 500

# Passes at which successive runs crash: the second run crashes at its first pass, which for
# several points is inside recovery (finalizing the staged output of the crashed run).
HITS = {"batch.mid": (5, 1, 9)}
DEFAULT_HITS = (2, 1, 3)


def sigkill_hits(point: str, kind: str) -> tuple[int, int]:
    """Two crashes per real-process case (each costs a process start): a later pass that
    differs by sink kind, then the first pass of the restart."""
    first = HITS.get(point, DEFAULT_HITS)[0] + 2 * SINK_KINDS.index(kind)
    return first, 1


def test_crash_points_are_the_protocol_steps() -> None:
    """The crash points exercised below are every step of the protocol, in order."""
    assert CRASH_POINTS == (
        "batch.mid", "commit.before_precommit", "commit.after_precommit",
        "store.before_commit", "commit.after_store", "sink.finalize.partial",
        "commit.after_finalize",
    )


def assert_chain_verifies(path: Any) -> None:
    store = rf.SQLiteStore(path, create=False)
    try:
        for task in store.tasks():
            assert verify_chain(task.task, store.records(task.task)) == []
    finally:
        store.close()


def check_outcome(work: Any, events: Any, kind: str) -> None:
    assert work.output(kind) == work.expected(events, kind), "lost or duplicated output"
    dead = work.dead_letters()
    assert [d["position"] for d in dead] == [offset for offset, _ in events.bad], \
        "lost or duplicated dead letters"
    assert all(d["kind"] == "bad-record" for d in dead)


@pytest.mark.slow
@pytest.mark.parametrize("kind", SINK_KINDS)
@pytest.mark.parametrize("point", CRASH_POINTS)
def test_sigkill_at_crash_point_then_resume(work: Any, point: str, kind: str) -> None:
    """SIGKILL at each crash point (at a later pass, then at the first pass of the restart,
    often inside recovery), then a clean run, gives exactly the fault-free output and dead
    letters, with replay within its bound."""
    events = work.events(10_000, bad_every=1250)
    spec = work.pipeline(events, kind)
    args = work.run_args(spec, replay_max_events=REPLAY_MAX_EVENTS)
    stderr = []
    for n in sigkill_hits(point, kind):
        crashed = work.cli(*args, crash_at=f"{point}:{n}")
        assert crashed.returncode == -9, f"{point}:{n} was never reached:\n{crashed.stderr}"
        stderr.append(crashed.stderr)
    done = work.cli(*args)
    assert done.returncode == 0, done.stderr
    stderr.append(done.stderr)
    check_outcome(work, events, kind)
    replayed = [n for text in stderr for n in work.replayed(text)]
    assert replayed and max(replayed) <= REPLAY_MAX_EVENTS
    assert_chain_verifies(work.store)


class Crash(BaseException):
    """Stands for the process dying at a crash point (not an Exception: nothing catches it)."""


def crash_at(point: str, n: int) -> Any:
    passes = {"n": 0}

    def hook(name: str) -> None:
        if name == point:
            passes["n"] += 1
            if passes["n"] == n:
                raise Crash(f"{point}:{n}")
    return hook


@pytest.mark.parametrize("kind", SINK_KINDS)
@pytest.mark.parametrize("point", CRASH_POINTS)
def test_in_process_crash_at_crash_point_then_resume(work: Any, point: str, kind: str) -> None:
    """A crash raised at each crash point, then a fresh Runtime on the same store, gives
    exactly the fault-free output."""
    events = work.events(5_000, bad_every=700)
    config = rf.RunConfig(replay_max_events=300, replay_max_seconds=60)
    for n in HITS.get(point, DEFAULT_HITS):
        with installed(crash_at(point, n)), pytest.raises(Crash):
            rf.run(work.flow(events, kind), work.store, config)
    summary = rf.run(work.flow(events, kind), work.store, config)
    assert summary.records_replayed <= config.replay_max_events
    check_outcome(work, events, kind)
    assert_chain_verifies(work.store)
