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
                undo: Undo, *, emit_can_fail: bool = True) -> Emit:
    """Fuse ``operators`` into a function that pushes one value through them to ``emit``.

    With ``emit_can_fail=False`` (the runtime's emit appends to a list), a stateful operator
    that ends the chain skips the undo log: nothing after its state change can fail.
    """
    keyed = False
    stages: list[tuple[Operator, bool]] = []
    for op in operators:
        stages.append((op, keyed))
        if op.kind == "key_by":
            keyed = True
    nxt = emit
    index = len(stages) - 1
    while index >= 0:
        op, is_keyed = stages[index]
        last = index == len(stages) - 1 and not emit_can_fail
        if op.stateful:
            before, before_keyed = stages[index - 1] if index else (None, True)
            key_fn = before.fn if before is not None and before.kind == "key_by" \
                and not before_keyed else None
            # The undo log is only needed when something after the state change can fail.
            nxt = _bind_stateful(op, nxt, states[op.name], undo, log_undo=not last,
                                 key_fn=key_fn)
            index -= 2 if key_fn is not None else 1
            continue
        nxt = _bind(op, nxt, is_keyed, states, undo)
        index -= 1
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


def _bind_stateful(op: Operator, nxt: Emit, state: KeyedState, undo: Undo, *, log_undo: bool,
                   key_fn: Callable[[Any], Any] | None) -> Emit:
    """A reduce or stateful_map; with ``key_fn``, fused with the ``key_by`` before it (one
    call per record instead of two)."""
    fn = op.fn
    initial = op.initial
    values = state.values
    dirty = state.dirty
    load = state.load
    log = undo.append
    reduce = op.kind == "reduce"

    def apply(key: Any, value: Any) -> None:
        old = values.get(key, MISSING)
        if old is MISSING:
            old = load(key)
        if reduce:
            new = fn(initial() if old is MISSING else old, value)
            out = new
        else:
            new, out = fn(initial() if old is MISSING else old, value)
        if log_undo:
            log((state, key, old, key in dirty))
        if new is None and not reduce:
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

    if key_fn is None:
        def on_item(item: Any) -> None:
            apply(item[0], item[1])
        return on_item if not reduce or log_undo else _fast_reduce(op, nxt, state, None)

    def on_value(value: Any) -> None:
        key = key_fn(value)
        apply(_hashable(key) if type(key) is list else key, value)
    return on_value if not reduce or log_undo else _fast_reduce(op, nxt, state, key_fn)


def _fast_reduce(op: Operator, nxt: Emit, state: KeyedState,
                 key_fn: Callable[[Any], Any] | None) -> Emit:
    """The hot path of a reduce that ends the chain: nothing after it can fail, so no undo."""
    fn = op.fn
    initial = op.initial
    values = state.values
    mark_dirty = state.dirty.add
    load = state.load
    get = values.get

    def reduce_value(value: Any) -> None:
        key = key_fn(value)  # type: ignore[misc]
        if type(key) is list:
            key = _hashable(key)
        old = get(key, MISSING)
        if old is MISSING:
            old = load(key)
            if old is MISSING:
                new = fn(initial(), value)
                state.keys += 1
            else:
                new = fn(old, value)
        else:
            new = fn(old, value)
        values[key] = new
        mark_dirty(key)
        nxt((key, new))

    def reduce_item(item: Any) -> None:
        key, value = item
        old = get(key, MISSING)
        if old is MISSING:
            old = load(key)
            if old is MISSING:
                new = fn(initial(), value)
                state.keys += 1
            else:
                new = fn(old, value)
        else:
            new = fn(old, value)
        values[key] = new
        mark_dirty(key)
        nxt((key, new))

    return reduce_value if key_fn is not None else reduce_item


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
