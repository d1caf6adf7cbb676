"""Compile a flow's operators into one function per task that processes one record.

Every change a record makes to keyed state is logged in ``undo`` until the record completes,
so a record that fails half-way is rolled back before it is retried: a retried record's
effect lands once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..state import MISSING, KeyedState
from ._flow import Operator

__all__ = ["Undo", "build_chain", "rollback"]

Undo = list[tuple[KeyedState, Any, Any, bool]]
"""Entries ``(state, key, old value or MISSING, key was dirty before)``, oldest first."""

Emit = Callable[[Any], None]


def build_chain(operators: list[Operator], emit: Emit, states: dict[str, KeyedState],
                undo: Undo) -> Emit:
    """Fuse ``operators`` into a function that pushes one value through them to ``emit``."""
    keyed = False
    stages: list[tuple[Operator, bool]] = []
    for op in operators:
        stages.append((op, keyed))
        if op.kind == "key_by":
            keyed = True
    nxt = emit
    for op, is_keyed in reversed(stages):
        nxt = _bind(op, nxt, is_keyed, states, undo)
    return nxt


def _bind(op: Operator, nxt: Emit, keyed: bool, states: dict[str, KeyedState],
          undo: Undo) -> Emit:
    fn = op.fn
    if op.kind == "key_by":
        if keyed:
            def rekey(item: Any) -> None:
                key = fn(item[1])
                nxt((_hashable(key) if type(key) is list else key, item[1]))
            return rekey

        def key_by(value: Any) -> None:
            key = fn(value)
            nxt((_hashable(key) if type(key) is list else key, value))
        return key_by
    if op.kind in ("reduce", "stateful_map"):
        return _bind_stateful(op, nxt, states[op.name], undo)
    if keyed:
        return _bind_keyed(op.kind, fn, nxt)
    return _bind_plain(op.kind, fn, nxt)


def _hashable(key: Any) -> Any:
    """A list key as a tuple (same JSON, same encoded state key), so it can index hot state."""
    if isinstance(key, list):
        return tuple(_hashable(k) for k in key)
    return key


def _bind_plain(kind: str, fn: Callable[[Any], Any], nxt: Emit) -> Emit:
    if kind == "map":
        def map_(value: Any) -> None:
            nxt(fn(value))
        return map_
    if kind == "filter":
        def filter_(value: Any) -> None:
            if fn(value):
                nxt(value)
        return filter_

    def flat_map(value: Any) -> None:
        for out in fn(value):
            nxt(out)
    return flat_map


def _bind_keyed(kind: str, fn: Callable[[Any], Any], nxt: Emit) -> Emit:
    if kind == "map":
        def map_(item: Any) -> None:
            nxt((item[0], fn(item[1])))
        return map_
    if kind == "filter":
        def filter_(item: Any) -> None:
            if fn(item[1]):
                nxt(item)
        return filter_

    def flat_map(item: Any) -> None:
        key = item[0]
        for out in fn(item[1]):
            nxt((key, out))
    return flat_map


def _bind_stateful(op: Operator, nxt: Emit, state: KeyedState, undo: Undo) -> Emit:
    fn = op.fn
    initial = op.initial
    values = state.values
    dirty = state.dirty
    load = state.load
    log = undo.append

    if op.kind == "reduce":
        def reduce(item: Any) -> None:
            key, value = item
            old = values.get(key, MISSING)
            if old is MISSING:
                old = load(key)
            new = fn(initial() if old is MISSING else old, value)
            log((state, key, old, key in dirty))
            if old is MISSING:
                state.keys += 1
            values[key] = new
            dirty.add(key)
            nxt((key, new))
        return reduce

    def stateful_map(item: Any) -> None:
        key, value = item
        old = values.get(key, MISSING)
        if old is MISSING:
            old = load(key)
        new, out = fn(initial() if old is MISSING else old, value)
        log((state, key, old, key in dirty))
        if new is None:
            if old is not MISSING:
                state.keys -= 1
                values.pop(key, None)
                dirty.add(key)
        else:
            if old is MISSING:
                state.keys += 1
            values[key] = new
            dirty.add(key)
        nxt((key, out))
    return stateful_map


def rollback(undo: Undo) -> None:
    """Undo the state changes logged for the current record, newest first."""
    while undo:
        state, key, old, was_dirty = undo.pop()
        new = state.values.get(key, MISSING)
        if old is MISSING:
            if new is not MISSING:
                state.keys -= 1
            state.values.pop(key, None)
        else:
            if new is MISSING:
                state.keys += 1
            state.values[key] = old
        if not was_dirty:
            state.dirty.discard(key)
