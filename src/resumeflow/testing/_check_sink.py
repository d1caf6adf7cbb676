"""``check_sink``: the contract every sink must pass, as one function.

It drives a sink's writers through the commit protocol by hand (pre-commit, the store's
commit, finalize) against a store, kills writers at every step (a writer is dropped without
``close``, as a crash drops it), recovers new writers from the store, and reads what an
outside reader of the sink sees. Under exactly-once: output of a checkpoint is invisible
before its commit point, visible exactly once after it whatever crashes happen (including
half-way through finalize and during recovery), and finalize is idempotent. Under
at-least-once: nothing committed is ever lost. A broken rule raises ``AssertionError``.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .._codec import decode, encode
from .._faults import installed
from ..checkpoint import GENESIS_DIGEST, CommitRecord, OpenedTask, Store, make_record
from ..sinks import Guarantee, Precommit, Sink, SinkContext, SinkWriter
from ._crash import SimulatedCrash
from ._store import MemoryStore

__all__ = ["SinkFixture", "check_sink"]

_TASK = "check-sink:source:0"


@dataclass(frozen=True, kw_only=True)
class SinkFixture:
    """A fresh sink under test, how to read it, and the store it commits with.

    Attributes:
        sink: the sink.
        read: returns the output an outside reader sees now, as the flow emitted it after a
            JSON round trip (keyed items as ``[key, value]``), in any order.
        store: the store its checkpoints commit to (a sink that writes inside the store's
            transaction needs its own store here).
        keyed: whether the stream is keyed (items are ``(key, value)``).
        guarantee: the guarantee to check.
    """

    sink: Sink
    read: Callable[[], list[Any]]
    store: Store = field(default_factory=MemoryStore)
    keyed: bool = True
    guarantee: Guarantee = "exactly-once"


class _Task:
    """One task's side of the protocol, by hand."""

    def __init__(self, fx: SinkFixture) -> None:
        self.fx = fx
        self.opened: OpenedTask = fx.store.open_task(_TASK)
        record = self.opened.record
        self.seq = record.seq if record else 0
        self.digest = record.digest if record else GENESIS_DIGEST
        ctx = SinkContext(sink_id="out", task=_TASK, partition="0", partitions=1,
                          keyed=fx.keyed, guarantee=fx.guarantee,
                          store_path=getattr(fx.store, "database_path", None))
        self.writer: SinkWriter = fx.sink.open(ctx)
        meta = record.sink_txn.get("out") if record else None
        self.writer.recover(meta, [e for e in self.opened.staged if e.sink == "out"])

    def precommit(self, items: list[Any]) -> Precommit:
        self.writer.buffer.extend(items)
        return self.writer.precommit(self.seq + 1)

    def commit(self, pre: Precommit) -> CommitRecord:
        seq = self.seq + 1
        record = make_record(task=_TASK, epoch=self.opened.epoch, seq=seq,
                             positions={"0": seq}, sink_txn={} if pre.meta is None else
                             {"out": pre.meta}, inflight=[], created_at=0.0, stats={},
                             prev_digest=self.digest)
        done = self.writer.releasable()
        self.fx.store.commit(self.opened, record, [],
                             [pre.staged] if pre.staged is not None else [],
                             [("out", done)] if done is not None else [],
                             [pre.in_store] if pre.in_store is not None else [])
        self.seq, self.digest = seq, record.digest
        return record

    def checkpoint(self, items: list[Any]) -> None:
        self.commit(self.precommit(items))
        self.writer.finalize(self.seq)


def _items(fx: SinkFixture, start: int, n: int) -> list[Any]:
    if fx.keyed:
        return [(f"key-{i}", {"n": i}) for i in range(start, start + n)]
    return [{"n": i} for i in range(start, start + n)]


def _norm(items: list[Any]) -> Counter[bytes]:
    return Counter(encode(decode(encode(x))) for x in items)


def _expect(fx: SinkFixture, committed: list[Any], situation: str) -> None:
    got, want = _norm(fx.read()), _norm(committed)
    if fx.guarantee == "at-least-once":
        missing = want - got
        if missing:
            raise AssertionError(f"check_sink: {situation}: committed output is missing "
                                 f"{sorted(missing)[:3]} (at-least-once may repeat, never "
                                 "lose)")
        return
    if got != want:
        raise AssertionError(
            f"check_sink: {situation}: a reader sees {sum(got.values())} item(s), expected "
            f"the {sum(want.values())} committed item(s) each once; missing "
            f"{sorted(want - got)[:3]}, extra {sorted(got - want)[:3]}")


def _crash_at(point: str, times: int = 1) -> Callable[[str], None]:
    left = [times]

    def hook(name: str) -> None:
        if name == point and left[0] > 0:
            left[0] -= 1
            raise SimulatedCrash(point)
    return hook


def check_sink(make_sink: Callable[[], SinkFixture]) -> None:
    """Check that sinks made by ``make_sink`` keep the sink contract.

    Args:
        make_sink: returns a ``SinkFixture`` over a fresh, empty sink and store each call.
    """
    for scenario in (_straight, _idempotent, _crash_before_commit, _crash_after_commit,
                     _crash_in_finalize, _crash_in_recovery):
        fx = make_sink()
        try:
            scenario(fx)
        finally:
            fx.store.close()


def _straight(fx: SinkFixture) -> None:
    task = _Task(fx)
    _expect(fx, [], "a fresh sink")
    first, second = _items(fx, 0, 3), _items(fx, 3, 2)
    task.checkpoint(first)
    task.checkpoint([])
    pre = task.precommit(second)
    if fx.guarantee == "exactly-once":
        _expect(fx, first, "after a pre-commit, before its commit point")
    task.commit(pre)
    task.writer.finalize(task.seq)
    _expect(fx, first + second, "three checkpoints, one of them empty")
    done = task.writer.releasable()
    if done is not None and done > task.seq:
        raise AssertionError(f"check_sink: releasable() is {done}, beyond the newest "
                             f"committed checkpoint {task.seq}")
    task.writer.close()


def _idempotent(fx: SinkFixture) -> None:
    task = _Task(fx)
    items = _items(fx, 0, 4)
    task.checkpoint(items)
    task.writer.finalize(task.seq)
    _expect(fx, items, "finalize called twice for one checkpoint")
    task.writer.close()
    for n in (1, 2):
        again = _Task(fx)
        _expect(fx, items, f"recovered {n} time(s) after a clean checkpoint")
        again.writer.close()


def _crash_before_commit(fx: SinkFixture) -> None:
    task = _Task(fx)
    kept, lost = _items(fx, 0, 2), _items(fx, 2, 3)
    task.checkpoint(kept)
    task.precommit(lost)  # the writer dies here: the commit point is never reached
    after = _Task(fx)
    _expect(fx, kept, "recovered after a crash between pre-commit and the commit point")
    more = _items(fx, 5, 2)
    after.checkpoint(more)
    _expect(fx, kept + more, "a checkpoint after that recovery")
    after.writer.close()


def _crash_after_commit(fx: SinkFixture) -> None:
    task = _Task(fx)
    first, second = _items(fx, 0, 2), _items(fx, 2, 3)
    task.checkpoint(first)
    task.commit(task.precommit(second))  # the writer dies before finalize
    after = _Task(fx)
    _expect(fx, first + second, "recovered after a crash between the commit point and "
            "finalize")
    after.checkpoint(_items(fx, 5, 1))
    _expect(fx, first + second + _items(fx, 5, 1), "a checkpoint after that recovery")
    after.writer.close()


def _crash_in_finalize(fx: SinkFixture) -> None:
    task = _Task(fx)
    items = _items(fx, 0, 6)
    task.commit(task.precommit(items))
    with installed(_crash_at("sink.finalize.partial")), contextlib.suppress(SimulatedCrash):
        task.writer.finalize(task.seq)
    after = _Task(fx)
    _expect(fx, items, "recovered after a crash half-way through finalize")
    after.writer.close()


def _crash_in_recovery(fx: SinkFixture) -> None:
    task = _Task(fx)
    items = _items(fx, 0, 6)
    task.commit(task.precommit(items))
    for point in ("sink.finalize.partial", "sink.finalize.partial"):
        with installed(_crash_at(point)), contextlib.suppress(SimulatedCrash):
            _Task(fx)
    after = _Task(fx)
    _expect(fx, items, "recovered after two crashes during recovery's finalize")
    after.checkpoint(_items(fx, 6, 2))
    _expect(fx, items + _items(fx, 6, 2), "a checkpoint after those recoveries")
    after.writer.close()
