"""``check_store``: the ``Store`` contract every store must pass, as one function.

It checks, on fresh stores: ``open_task`` hands out strictly increasing epochs and the newest
commit record with the state and staged output as of it; ``commit`` is refused with
``FencedError`` on a stale epoch and then writes nothing; a crash inside ``commit`` (crash point
``store.before_commit``) writes nothing; a seq that does not follow the last one is refused;
state is versioned (tombstones read as absent); released staging is gone; tasks are
independent; retained records form a verifying digest chain no longer than
``keep_checkpoints``; and, given a way to corrupt the newest record, that ``open_task`` falls
back to the one before with that checkpoint's exact state and reports the discarded seq.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from typing import Any

from .._faults import installed
from ..checkpoint import (
    GENESIS_DIGEST,
    CommitRecord,
    OpenedTask,
    StagedEntry,
    Store,
    decode_record,
    make_record,
)
from ..errors import FencedError, ResumeflowError
from ._crash import SimulatedCrash

__all__ = ["check_store"]

_A, _B = "check-store:src:a", "check-store:src:b"


def _fail(message: str) -> None:
    raise AssertionError(f"check_store: {message}")


def _record(opened: OpenedTask, seq: int, prev: CommitRecord | None, **extra: Any) -> CommitRecord:
    return make_record(task=opened.task, epoch=opened.epoch, seq=seq, positions={"0": seq * 10},
                       sink_txn=extra.get("sink_txn", {}), inflight=[], created_at=float(seq),
                       stats={"records_in": seq}, prev_digest=prev.digest if prev else
                       GENESIS_DIGEST)


def _staged(seq: int) -> StagedEntry:
    return StagedEntry(sink="out", seq=seq, meta={"seq": seq}, payload=f"out-{seq}".encode())


def _state(store: Store, opened: OpenedTask, key: bytes, want: bytes | None, when: str, *,
           epoch: int | None = None) -> None:
    got = store.load_state(opened.task_no, key, epoch)
    if got != want:
        _fail(f"{when}: load_state({key!r}) is {got!r}, expected {want!r}")


def check_store(make_store: Callable[[], Store], *,
                corrupt_latest: Callable[[Store, str], None] | None = None) -> None:
    """Check that stores made by ``make_store`` keep the store contract.

    Args:
        make_store: returns a fresh, empty store each call.
        corrupt_latest: damages the newest commit record of a task in a store (as a torn
            write would); when given, fallback to the previous checkpoint is checked too.
    """
    for scenario in (_lifecycle, _atomic, _retention):
        store = make_store()
        try:
            scenario(store)
        finally:
            store.close()
            store.close()
    if corrupt_latest is not None:
        store = make_store()
        try:
            _fallback(store, corrupt_latest)
        finally:
            store.close()


def _lifecycle(store: Store) -> None:
    first = store.open_task(_A)
    if first.record is not None or first.staged or first.epoch < 1:
        _fail(f"a new task opens with record {first.record!r}, staged {first.staged!r}, "
              f"epoch {first.epoch}; expected no record, nothing staged, epoch >= 1")
    r1 = _record(first, 1, None, sink_txn={"out": {"seq": 1}})
    store.commit(first, r1, [(b"k1", b"1"), (b"k2", b"2")], [_staged(1)], [])
    _state(store, first, b"k1", b"1", "after commit seq 1")
    _state(store, first, b"never", None, "a key never written")
    second = store.open_task(_A)
    if second.epoch <= first.epoch:
        _fail(f"reopening gave epoch {second.epoch} after epoch {first.epoch}")
    if second.record != r1:
        _fail(f"reopening returned {second.record!r}, expected the committed seq 1")
    if [e.seq for e in second.staged] != [1] or second.staged[0].payload != b"out-1":
        _fail(f"reopening returned staged {second.staged!r}, expected seq 1's entry")
    try:
        store.commit(first, _record(first, 2, r1), [(b"k1", b"zombie")], [], [])
    except FencedError:
        pass
    else:
        _fail("a commit from a stale epoch was accepted; it must raise FencedError")
    third = store.open_task(_A)
    if third.record != r1:
        _fail("a refused stale-epoch commit changed the newest record")
    _state(store, third, b"k1", b"1", "after a refused stale-epoch commit")
    _state(store, third, b"k1", b"1", "read with the owner's epoch", epoch=third.epoch)
    try:
        got = store.load_state(first.task_no, b"k1", first.epoch)
    except FencedError:
        pass
    else:
        _fail(f"a read with a stale epoch returned {got!r}; it must raise FencedError (a "
              "fenced worker would fold its records into the new owner's state)")
    r2 = _record(third, 2, r1)
    store.commit(third, r2, [(b"k1", b"1b"), (b"k2", None)], [], [("out", 1)])
    _state(store, third, b"k2", None, "a key deleted (tombstone) at seq 2")
    _state(store, third, b"k1", b"1b", "a key updated at seq 2")
    try:
        store.commit(third, _record(third, 4, r2), [], [], [])
    except ResumeflowError:
        pass
    else:
        _fail("commit seq 4 right after seq 2 was accepted; a seq must follow the last one")
    fourth = store.open_task(_A)
    if fourth.record != r2 or fourth.staged:
        _fail(f"after releasing seq 1's staging, reopening returned record "
              f"{fourth.record!r} and staged {fourth.staged!r}")
    other = store.open_task(_B)
    if other.record is not None or other.task_no == fourth.task_no:
        _fail("a second task shares state or records with the first")
    _state(store, other, b"k1", None, "another task's key")
    store.commit(other, _record(other, 1, None), [(b"k1", b"b")], [], [])
    _state(store, fourth, b"k1", b"1b", "after another task wrote the same key")
    names = {s.task: s for s in store.tasks()}
    if set(names) != {_A, _B} or names[_A].record != r2:
        _fail(f"tasks() lists {sorted(names)} with newest {names.get(_A)!r}")


def _atomic(store: Store) -> None:
    opened = store.open_task(_A)
    r1 = _record(opened, 1, None)
    store.commit(opened, r1, [(b"k", b"1")], [_staged(1)], [])

    def crash(point: str) -> None:
        if point == "store.before_commit":
            raise SimulatedCrash(point)

    with installed(crash), contextlib.suppress(SimulatedCrash):
        store.commit(opened, _record(opened, 2, r1), [(b"k", b"2"), (b"n", b"x")],
                     [_staged(2)], [("out", 1)])
    again = store.open_task(_A)
    if again.record != r1 or [e.seq for e in again.staged] != [1]:
        _fail(f"a crash inside commit seq 2 left record {again.record!r} and staged "
              f"{[e.seq for e in again.staged]}; a commit is all or nothing")
    _state(store, again, b"k", b"1", "after a crash inside commit")
    _state(store, again, b"n", None, "after a crash inside commit")
    store.commit(again, _record(again, 2, r1), [(b"k", b"2")], [], [])
    _state(store, again, b"k", b"2", "the commit retried after the crash")


def _retention(store: Store) -> None:
    opened = store.open_task(_A)
    keep = store.keep_checkpoints
    prev: CommitRecord | None = None
    for seq in range(1, keep + 4):
        record = _record(opened, seq, prev)
        store.commit(opened, record, [(b"k", str(seq).encode()), (f"s{seq}".encode(), b"v")],
                     [], [])
        prev = record
    raw = store.records(_A)
    seqs = [seq for seq, _ in raw]
    if not 2 <= len(raw) <= keep or seqs != sorted(seqs) or seqs[-1] != keep + 3:
        _fail(f"after {keep + 3} commits with keep_checkpoints={keep}, records() has seqs "
              f"{seqs}; expected the newest 2 to {keep}, oldest first")
    chain = [decode_record(r) for _, r in raw]
    for older, newer in itertools.pairwise(chain):
        if newer.prev_digest != older.digest:
            _fail(f"digest chain broken between seq {older.seq} and seq {newer.seq}")
    again = store.open_task(_A)
    _state(store, again, b"k", str(keep + 3).encode(), "after many commits")
    _state(store, again, b"s1", b"v", "a key written once long ago")


def _fallback(store: Store, corrupt_latest: Callable[[Store, str], None]) -> None:
    opened = store.open_task(_A)
    r1 = _record(opened, 1, None, sink_txn={"out": {"seq": 1}})
    store.commit(opened, r1, [(b"k", b"1"), (b"gone", b"x")], [_staged(1)], [])
    r2 = _record(opened, 2, r1, sink_txn={"out": {"seq": 2}})
    store.commit(opened, r2, [(b"k", b"2"), (b"gone", None), (b"new", b"n")], [_staged(2)],
                 [])
    corrupt_latest(store, _A)
    back = store.open_task(_A)
    if back.record != r1 or tuple(back.discarded_seqs) != (2,):
        _fail(f"with seq 2 corrupt, open_task returned record {back.record!r} and "
              f"discarded {back.discarded_seqs!r}; expected seq 1 and (2,)")
    if [e.seq for e in back.staged] != [1]:
        _fail(f"with seq 2 corrupt, open_task returned staged {[e.seq for e in back.staged]};"
              " expected only seq 1's")
    _state(store, back, b"k", b"1", "fallback to seq 1")
    _state(store, back, b"gone", b"x", "fallback to seq 1 (key deleted at seq 2)")
    _state(store, back, b"new", None, "fallback to seq 1 (key created at seq 2)")
    r2b = _record(back, 2, r1)
    store.commit(back, r2b, [(b"k", b"2b")], [], [])
    if store.open_task(_A).record != r2b:
        _fail("after a fallback, the next commit of seq 2 is not the newest record")
