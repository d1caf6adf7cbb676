"""Flows: misuse fails fast; operators mean what they say; a failed record lands once."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import resumeflow as rf
from resumeflow.errors import ConfigurationError
from resumeflow.flow import build_chain, rollback
from resumeflow.flow._compile import Undo
from resumeflow.state import MISSING, KeyedState

NO_BACKOFF = rf.RunConfig(retry_backoff_base_s=0, retry_backoff_max_s=0)


def run_flow(tmp_path: Path, values: list[Any], build: Callable[[Any], Any], *,
             config: rf.RunConfig = NO_BACKOFF, name: str = "run") -> list[Any]:
    """Run ``values`` through ``build(stream)`` into a JSON-lines sink; returns its lines.

    Calling it again with the same ``name`` appends ``values`` to the input and resumes.
    """
    source = tmp_path / f"{name}.in.jsonl"
    with open(source, "a") as f:
        f.writelines(json.dumps(v) + "\n" for v in values)
    out = tmp_path / f"{name}.out.jsonl"
    flow = rf.Flow(name)
    build(flow.source(rf.sources.JsonLines(source))).sink(rf.sinks.JsonLinesSink(out))
    rf.run(flow, tmp_path / f"{name}.db", config)
    return [json.loads(line) for line in out.read_text().splitlines()]


# -- misuse -------------------------------------------------------------------------------


def _stream(tmp_path: Path) -> Any:
    return rf.Flow("f").source(rf.sources.JsonLines(tmp_path / "x.jsonl"))


def test_flow_name_must_be_usable_in_task_ids() -> None:
    """A flow name is part of task ids: empty names and ``:`` are refused."""
    for bad in ("", "a:b"):
        with pytest.raises(ConfigurationError, match="without ':'"):
            rf.Flow(bad)


def test_flow_without_source_or_sink_cannot_run(tmp_path: Path) -> None:
    """Running a flow that lacks a source or a sink fails before any I/O, saying which."""
    with pytest.raises(ConfigurationError, match=r"no source; call flow.source"):
        rf.Flow("f").validate()
    flow = rf.Flow("f")
    flow.source(rf.sources.JsonLines(tmp_path / "x.jsonl")).map(str)
    with pytest.raises(ConfigurationError, match=r"no sink; end the chain with .sink"):
        rf.Runtime(flow, tmp_path / "s.db")
    assert not (tmp_path / "s.db").exists()


def test_second_source_is_refused(tmp_path: Path) -> None:
    """A flow has exactly one source."""
    flow = rf.Flow("f")
    flow.source(rf.sources.JsonLines(tmp_path / "x.jsonl"))
    with pytest.raises(ConfigurationError, match="already has a source"):
        flow.source(rf.sources.JsonLines(tmp_path / "y.jsonl"))


def test_nothing_after_the_sink(tmp_path: Path) -> None:
    """Once a stream ends in a sink, neither operators nor another sink can follow."""
    stream = _stream(tmp_path)
    stream.sink(rf.sinks.Stdout())
    with pytest.raises(ConfigurationError, match="already ends in a sink"):
        stream.map(str)
    with pytest.raises(ConfigurationError, match="already ends in a sink"):
        stream.sink(rf.sinks.Stdout())


@pytest.mark.parametrize("op", ["reduce", "stateful_map"])
def test_stateful_operators_need_a_key(tmp_path: Path, op: str) -> None:
    """``reduce`` and ``stateful_map`` keep state per key: they require ``key_by`` first."""
    with pytest.raises(ConfigurationError, match=r"call .key_by\(...\) before it"):
        getattr(_stream(tmp_path), op)(lambda s, v: (s, v))


def test_state_names_must_be_unique(tmp_path: Path) -> None:
    """Two stateful operators cannot share a state name (their checkpoints would mix)."""
    stream = _stream(tmp_path).key_by(str).reduce(max, name="m")
    with pytest.raises(ConfigurationError, match="used twice"):
        stream.reduce(min, name="m")
    with pytest.raises(ConfigurationError, match="empty or used twice"):
        stream.reduce(min, name="")


def test_default_state_names_are_stable(tmp_path: Path) -> None:
    """Unnamed stateful operators are named by kind and position, the same on every build."""
    def names() -> list[str]:
        flow = rf.Flow("f")
        (flow.source(rf.sources.JsonLines(tmp_path / "x.jsonl")).key_by(str)
             .reduce(max).stateful_map(lambda s, v: (s, v)).reduce(min))
        return [op.name for op in flow.operators if op.stateful]
    assert names() == names() == ["reduce0", "stateful_map1", "reduce2"]


# -- semantics ----------------------------------------------------------------------------


def test_map_filter_flat_map(tmp_path: Path) -> None:
    """map transforms, filter keeps true values, flat_map emits every item (or none)."""
    out = run_flow(tmp_path, list(range(6)), lambda s: (
        s.map(lambda v: v * 10).filter(lambda v: v % 20 == 0)
         .flat_map(lambda v: [v] * (v // 20))))
    assert out == [20, 40, 40]


def test_key_by_emits_pairs_and_later_operators_keep_the_key(tmp_path: Path) -> None:
    """After key_by, map/filter/flat_map work on values and keep each value's key."""
    events = [{"k": "a", "v": 1}, {"k": "b", "v": 2}, {"k": "a", "v": 3}]
    out = run_flow(tmp_path, events, lambda s: (
        s.key_by(lambda e: e["k"]).map(lambda e: e["v"]).filter(lambda v: v != 2)
         .flat_map(lambda v: [v, -v])))
    assert out == [{"key": "a", "value": 1}, {"key": "a", "value": -1},
                   {"key": "a", "value": 3}, {"key": "a", "value": -3}]


def test_key_by_again_rekeys(tmp_path: Path) -> None:
    """A second key_by replaces the key, computed from the value."""
    out = run_flow(tmp_path, [{"a": 1, "b": "x"}], lambda s: (
        s.key_by(lambda e: e["a"]).key_by(lambda e: e["b"])))
    assert out == [{"key": "x", "value": {"a": 1, "b": "x"}}]


def test_list_keys(tmp_path: Path) -> None:
    """Keys may be lists of scalars; each list keeps its own state, also after a restart."""
    def build(s: Any) -> Any:
        return s.key_by(lambda e: e["k"]).reduce(lambda t, e: t + e["v"], initial=0)
    events = [{"k": ["a", 1], "v": 1}, {"k": ["a", 2], "v": 5}, {"k": ["a", 1], "v": 2}]
    out = run_flow(tmp_path, events, build)
    assert out == [{"key": ["a", 1], "value": 1}, {"key": ["a", 2], "value": 5},
                   {"key": ["a", 1], "value": 3}]
    out = run_flow(tmp_path, [{"k": ["a", 2], "v": 1}], build)
    assert out[-1] == {"key": ["a", 2], "value": 6}


def test_reduce_keeps_a_running_aggregate_per_key(tmp_path: Path) -> None:
    """reduce emits ``(key, state)`` after each value, state starting at ``initial``."""
    events = [{"k": k, "v": v} for k, v in [("a", 1), ("b", 10), ("a", 2), ("b", 20)]]
    out = run_flow(tmp_path, events, lambda s: (
        s.key_by(lambda e: e["k"]).reduce(lambda t, e: t + e["v"], initial=100)))
    assert out == [{"key": "a", "value": 101}, {"key": "b", "value": 110},
                   {"key": "a", "value": 103}, {"key": "b", "value": 130}]


def test_mutable_initial_state_is_not_shared_between_keys(tmp_path: Path) -> None:
    """A mutable ``initial`` is copied per key, never shared."""
    events = [{"k": "a", "v": 1}, {"k": "b", "v": 2}]
    out = run_flow(tmp_path, events, lambda s: (
        s.key_by(lambda e: e["k"]).reduce(lambda t, e: [*t, e["v"]], initial=[])))
    assert out == [{"key": "a", "value": [1]}, {"key": "b", "value": [2]}]


def test_stateful_map_keeps_user_state_and_none_deletes_it(tmp_path: Path) -> None:
    """stateful_map emits ``out`` and keeps ``new_state``; a ``None`` state deletes the key."""
    def count_until_reset(state: int, e: dict[str, Any]) -> tuple[Any, Any]:
        if e["v"] == "reset":
            return None, f"reset after {state}"
        return state + 1, state + 1

    events = [{"k": "a", "v": x} for x in ("x", "x", "reset", "x")]
    out = run_flow(tmp_path, events, lambda s: (
        s.key_by(lambda e: e["k"]).stateful_map(count_until_reset, initial=0)))
    assert [o["value"] for o in out] == [1, 2, "reset after 2", 1]


def test_state_carries_over_to_the_next_run(tmp_path: Path) -> None:
    """A second run on the same store continues every key from its committed state."""
    def build(s: Any) -> Any:
        return s.key_by(lambda e: e["k"]).reduce(lambda t, e: t + e["v"], initial=0)
    run_flow(tmp_path, [{"k": "a", "v": 1}, {"k": "b", "v": 1}], build)
    out = run_flow(tmp_path, [{"k": "a", "v": 5}], build)
    assert out[-1] == {"key": "a", "value": 6}
    assert len(out) == 3


# -- failures inside a record -------------------------------------------------------------


def test_record_failing_half_way_is_rolled_back_before_retry(tmp_path: Path) -> None:
    """A record that changed state and then failed is undone, so its retry lands once."""
    failures = {"left": 2}

    def flaky(total: int) -> int:
        if total == 6 and failures["left"]:
            failures["left"] -= 1
            raise ConnectionError("flaky downstream")
        return total

    events = [{"k": "a", "v": v} for v in (1, 2, 3, 4)]
    out = run_flow(tmp_path, events, lambda s: (
        s.key_by(lambda e: e["k"]).reduce(lambda t, e: t + e["v"], initial=0).map(flaky)))
    assert failures["left"] == 0
    assert out == [{"key": "a", "value": v} for v in (1, 3, 6, 10)]


def test_flat_map_output_and_state_of_a_failed_record_are_dropped(tmp_path: Path) -> None:
    """Items a record emitted before failing are discarded and its state changes undone."""
    failures = {"left": 1}

    def explode(e: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"k": e["k"], "v": 1}, {"k": e["k"], "v": 10}, {"k": "other", "v": 100}]

    def fail_once(total: int) -> int:
        if total == 22 and failures["left"]:
            failures["left"] -= 1
            raise TimeoutError("once")
        return total

    out = run_flow(tmp_path, [{"k": "a"}, {"k": "a"}], lambda s: (
        s.flat_map(explode).key_by(lambda e: e["k"])
         .reduce(lambda t, e: t + e["v"], initial=0).map(fail_once)))
    assert failures["left"] == 0
    assert out == [{"key": "a", "value": 1}, {"key": "a", "value": 11},
                   {"key": "other", "value": 100}, {"key": "a", "value": 12},
                   {"key": "a", "value": 22}, {"key": "other", "value": 200}]


def test_rollback_restores_values_dirty_set_and_key_count() -> None:
    """``rollback`` returns state to exactly what it was before the failed record."""
    committed = {b"s\x00" + json.dumps(k).encode(): b"5" for k in ("old",)}
    state = KeyedState(committed.get, namespace="s", max_hot_keys=math.inf, keys_committed=1)
    state.get("old")
    state.set("touched", 1, existed=False)  # an earlier record of this checkpoint
    before = (dict(state.values), set(state.dirty), state.keys)
    undo: Undo = []
    out: list[Any] = []
    flow = rf.Flow("f")
    stream = flow.source(rf.sources.JsonLines("unused")).key_by(lambda e: e[0])
    stream.stateful_map(lambda s, e: (None if e[1] == "del" else (s or 0) + e[1], e), name="s")

    def fail(_: Any) -> None:
        raise RuntimeError("after the state changed")

    chain = build_chain(flow.operators, fail, {"s": state}, undo)
    for record in (["old", 1], ["new", 1], ["old", "del"], ["touched", 2]):
        with pytest.raises(RuntimeError):
            chain(record)
        rollback(undo)
        assert undo == []
        assert (dict(state.values), set(state.dirty), state.keys) == before
    ok = build_chain(flow.operators, out.append, {"s": state}, undo)
    ok(["old", "del"])
    assert state.get("old") is MISSING and state.keys == 1 and "old" in state.dirty
