"""Poison and malformed records are dead-lettered once, with where they were, and skipped."""

from __future__ import annotations

from collections import Counter
from typing import Any

import resumeflow as rf

NO_BACKOFF = rf.RunConfig(max_attempts=4, retry_backoff_base_s=0, retry_backoff_max_s=0,
                          replay_max_events=500)
POISON = (777, 1500)


class Poison:
    """A user function that raises on some event ids, counting every call per id."""

    def __init__(self, ids: tuple[int, ...]) -> None:
        self.ids = ids
        self.calls: Counter[int] = Counter()

    def __call__(self, event: dict[str, Any]) -> dict[str, Any]:
        self.calls[event["id"]] += 1
        if event["id"] in self.ids:
            raise ValueError(f"poison event {event['id']}")
        return event


def test_poison_record_is_retried_then_dead_lettered_with_its_position(work: Any) -> None:
    """A record whose user function always raises is tried ``max_attempts`` times, then
    dead-lettered with source, partition, byte position, error and traceback; every other
    record's effect is in the output once."""
    events = work.events(3000)
    check = Poison(POISON)
    summary = rf.run(work.flow(events, check=check), work.store, NO_BACKOFF)
    assert summary.dead_letters == 2
    assert all(check.calls[i] == NO_BACKOFF.max_attempts for i in POISON)
    assert all(n == 1 for i, n in check.calls.items() if i not in POISON)

    offset_of = dict(zip((e["id"] for e in events.events), events.offsets, strict=True))
    dead = work.dead_letters()
    assert [d["position"] for d in dead] == [offset_of[i] for i in POISON]
    raw = events.path.read_bytes()
    for letter, poison_id in zip(dead, POISON, strict=True):
        assert letter["source"] == "events.jsonl" and letter["partition"] == "0"
        assert letter["task"] == "orders:events.jsonl:0"
        assert letter["kind"] == "poison" and letter["attempts"] == NO_BACKOFF.max_attempts
        assert letter["error"] == f"ValueError: poison event {poison_id}"
        assert "Traceback" in letter["traceback"] and "__call__" in letter["traceback"]
        line = raw[letter["position"]:].split(b"\n", 1)[0]
        assert letter["record"] == line.decode()
        assert f'"id":{poison_id},' in letter["record"]

    events.events = [e for e in events.events if e["id"] not in POISON]
    assert work.output("jsonl") == events.running_totals()


def test_rerun_never_trips_on_a_dead_lettered_record(work: Any) -> None:
    """The poison record's position is committed: later runs do not read it again."""
    events = work.events(2000)
    rf.run(work.flow(events, check=Poison((777, 2100))), work.store, NO_BACKOFF)
    events.append(500)
    again = Poison((777, 2100))
    summary = rf.run(work.flow(events, check=again), work.store, NO_BACKOFF)
    assert summary.records_in == 500
    assert summary.dead_letters == 2  # carried over from the first run, plus event 2100
    assert again.calls[777] == 0
    assert again.calls[2100] == NO_BACKOFF.max_attempts
    ids = [e["id"] for e in events.events]
    assert [d["position"] for d in work.dead_letters()] == [
        events.offsets[ids.index(777)], events.offsets[ids.index(2100)]]
    events.events = [e for e in events.events if e["id"] not in (777, 2100)]
    assert work.output("jsonl") == events.running_totals()


def test_bad_json_line_is_dead_lettered_as_bad_record(work: Any) -> None:
    """A line that is not JSON becomes a ``bad-record`` dead letter with its byte position,
    tried once (decoding again cannot help)."""
    events = work.events(3000, bad_every=1000)
    summary = rf.run(work.flow(events), work.store, NO_BACKOFF)
    dead = work.dead_letters()
    assert summary.dead_letters == len(events.bad) == 3
    assert [(d["position"], d["record"].encode()) for d in dead] == events.bad
    assert all(d["kind"] == "bad-record" and d["attempts"] == 1 for d in dead)
    assert all(d["error"].startswith("DecodeError") for d in dead)
    assert work.output("jsonl") == events.running_totals()


def test_status_counts_dead_letters(work: Any) -> None:
    """The commit record carries the dead-letter count across runs (shown by ``status``)."""
    events = work.events(1000, bad_every=400)
    rf.run(work.flow(events, check=Poison((10,))), work.store, NO_BACKOFF)
    store = rf.SQLiteStore(work.store, create=False)
    (status,) = store.tasks()
    store.close()
    assert status.record is not None
    assert status.record.stats["dead_letters"] == 3
