"""KeyedState: lazy loads, dirty tracking, deltas of dirty keys only, tombstones, eviction."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from resumeflow._codec import encode_key
from resumeflow.state import MISSING, KeyedState


class ColdStore:
    """Committed values by encoded key, counting every read."""

    def __init__(self, values: dict[Any, Any] | None = None, namespace: str = "") -> None:
        prefix = namespace.encode() + b"\x00" if namespace else b""
        self.rows = {prefix + encode_key(k): json.dumps(v).encode()
                     for k, v in (values or {}).items()}
        self.reads: list[bytes] = []

    def load(self, key: bytes) -> bytes | None:
        self.reads.append(key)
        return self.rows.get(key)


def test_opening_state_reads_nothing() -> None:
    """Creating the state of a task with many committed keys reads no row at all."""
    cold = ColdStore({f"k{i}": i for i in range(1000)})
    state = KeyedState(cold.load, max_hot_keys=math.inf, keys_committed=1000)
    assert cold.reads == []
    assert state.keys == 1000 and state.loads == 0 and state.values == {}


def test_keys_load_lazily_and_once() -> None:
    """A cold key is read from the store on first touch, then served from memory."""
    cold = ColdStore({"a": 1, "b": [1, 2]})
    state = KeyedState(cold.load, max_hot_keys=math.inf)
    assert state.get("a") == 1
    assert state.get("a") == 1
    assert state.get("b") == [1, 2]
    assert state.get("zzz") is MISSING
    assert cold.reads == [encode_key("a"), encode_key("b"), encode_key("zzz")]
    assert state.loads == 3


def test_namespace_prefixes_the_store_key() -> None:
    """Keys of one operator's state are read under its namespace, not bare."""
    cold = ColdStore({"a": 5}, namespace="reduce0")
    state = KeyedState(cold.load, max_hot_keys=math.inf, namespace="reduce0")
    assert state.get("a") == 5
    assert cold.reads == [b"reduce0\x00" + encode_key("a")]
    state.set("a", 6, existed=True)
    assert state.take_delta() == [(b"reduce0\x00" + encode_key("a"), b"6")]


def test_dirty_tracking_and_delta_holds_only_dirty_keys() -> None:
    """Reading keys leaves them clean; only changed keys go into the delta, once."""
    cold = ColdStore({"a": 1, "b": 2, "c": 3})
    state = KeyedState(cold.load, max_hot_keys=math.inf, keys_committed=3)
    for key in ("a", "b", "c"):
        state.get(key)
    assert state.dirty == set()
    state.set("b", 20, existed=True)
    state.set("d", 4, existed=False)
    assert state.dirty == {"b", "d"}
    assert sorted(state.take_delta()) == [(encode_key("b"), b"20"), (encode_key("d"), b"4")]
    assert state.dirty == set()
    assert state.take_delta() == []
    assert state.keys == 4


def test_deleted_keys_become_tombstones() -> None:
    """Deleting a key writes a tombstone, counts the key gone, and does not reload it."""
    cold = ColdStore({"a": 1})
    state = KeyedState(cold.load, max_hot_keys=math.inf, keys_committed=1)
    assert state.get("a") == 1
    state.set("a", MISSING, existed=True)
    assert state.keys == 0
    assert state.get("a") is MISSING
    assert cold.reads == [encode_key("a")], "a deleted, dirty key is not read back from the store"
    assert state.take_delta() == [(encode_key("a"), None)]


def test_eviction_drops_clean_keys_only() -> None:
    """Past ``max_hot_keys``, clean keys are evicted and dirty keys always stay."""
    state = KeyedState(ColdStore().load, max_hot_keys=10)
    for i in range(30):
        state.set(i, i, existed=False)
    state.take_delta()  # all 30 clean now
    for i in range(0, 30, 3):
        state.set(i, -i, existed=True)  # 10 dirty keys
    dropped = state.evict()
    assert dropped > 0
    assert len(state.values) <= 30 - dropped
    assert all(key in state.values for key in state.dirty)
    assert {key: state.values[key] for key in state.dirty} == {i: -i for i in range(0, 30, 3)}


def test_eviction_never_drops_dirty_keys_even_when_all_are_dirty() -> None:
    """When every hot key is dirty, eviction drops nothing, whatever the bound."""
    state = KeyedState(ColdStore().load, max_hot_keys=2)
    for i in range(50):
        state.set(i, i, existed=False)
    assert state.evict() == 0
    assert len(state.values) == 50


def test_evicted_keys_reload_their_committed_value() -> None:
    """A key evicted after its checkpoint reads its committed value back from the store."""
    cold = ColdStore()
    state = KeyedState(cold.load, max_hot_keys=1)
    state.set("a", 1, existed=False)
    state.set("b", 2, existed=False)
    for key, value in state.take_delta():
        cold.rows[key] = value  # the commit writes the delta
    state.evict()
    evicted = [k for k in ("a", "b") if k not in state.values]
    assert evicted
    for key in evicted:
        assert state.get(key) == {"a": 1, "b": 2}[key]


def test_unbounded_hot_set_never_evicts() -> None:
    """``math.inf`` keeps every key hot."""
    state = KeyedState(ColdStore().load, max_hot_keys=math.inf)
    for i in range(100):
        state.set(i, i, existed=False)
    state.take_delta()
    assert state.evict() == 0 and len(state.values) == 100


def test_bounded_hot_set_gives_the_same_output_end_to_end(work: Any) -> None:
    """A flow whose hot set is far smaller than its keys evicts and reloads them from the
    store at every checkpoint, and still writes exactly the reference output."""
    import resumeflow as rf

    events = work.events(6000, customers=300)
    config = rf.RunConfig(max_hot_keys=20, replay_max_events=250, replay_max_seconds=3600)
    runtime = rf.Runtime(work.flow(events), work.store, config)
    runtime.run()
    state = runtime.tasks[0].states["reduce0"]
    assert len(state.values) <= 20  # evicted down to the bound after the last checkpoint
    assert state.loads > 300  # more cold reads than keys: evicted keys were read back
    assert work.output("jsonl") == events.running_totals()


def test_a_key_deleted_by_an_unsettled_delta_reads_absent_without_the_store() -> None:
    """Between ``take_delta`` and ``settle`` (the delta not yet durable) a key it deletes
    reads as absent without a store read; after ``settle`` cold reads go to the store."""
    cold = ColdStore({"a": 1, "b": 2})
    state = KeyedState(cold.load, max_hot_keys=math.inf, keys_committed=2)
    assert state.get("a") == 1
    state.set("a", MISSING, existed=True)
    assert state.take_delta() == [(encode_key("a"), None)]
    reads = len(cold.reads)
    assert state.get("a") is MISSING and len(cold.reads) == reads
    state.settle()
    del cold.rows[encode_key("a")]
    assert state.get("a") is MISSING and len(cold.reads) == reads + 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.tuples(st.one_of(st.integers(-50, 50), st.text(max_size=3)),
                                   st.one_of(st.none(), st.integers())), max_size=30),
                min_size=1, max_size=8))
def test_each_delta_is_sorted_by_encoding_and_holds_exactly_the_window_changes(
        windows: list[list[tuple[Any, int | None]]]) -> None:
    """Over windows that change the same keys again, new ones and deletions, each delta is
    the window's changes, encoded afresh and sorted by encoded key, whatever the last delta
    held (its keys' encodings and order are reused)."""
    state = KeyedState(ColdStore().load, max_hot_keys=math.inf, namespace="s",
                       known_empty=True)
    prefix = b"s\x00"
    for window in windows:
        changed: dict[Any, Any] = {}
        for key, value in window:
            existed = state.get(key) is not MISSING
            state.set(key, MISSING if value is None else value, existed=existed)
            changed[key] = value
        expected = sorted((prefix + encode_key(k), None if v is None else encode_key(v))
                          for k, v in changed.items())
        assert state.take_delta() == expected
        assert state.dirty == set()


def test_a_delta_of_the_same_keys_again_carries_their_new_values() -> None:
    """A window that changes exactly the keys of the last delta gives those keys, in the same
    order, with this window's values (the path that neither encodes nor sorts keys)."""
    state = KeyedState(ColdStore().load, max_hot_keys=math.inf, known_empty=True)
    keys = [f"k{i}" for i in range(300)]
    for key in keys:
        state.set(key, 1, existed=False)
    first = state.take_delta()
    for key in reversed(keys):
        state.set(key, 2, existed=True)
    second = state.take_delta()
    assert [k for k, _ in second] == [k for k, _ in first] == sorted(encode_key(k) for k in keys)
    assert {v for _, v in second} == {b"2"}
