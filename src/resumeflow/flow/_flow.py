"""Flows: a source, a chain of operators and a sink, described once and run per partition.

Building a flow does no I/O and fails fast on misuse (a sink before a source, ``reduce`` on a
stream without a key). Operators after ``key_by`` work on values and keep their key.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigurationError
from ..sinks import Sink
from ..sources import Source

__all__ = ["Flow", "Operator", "Stream"]

_IMMUTABLE = (int, float, str, bool, bytes, type(None), tuple, frozenset)


@dataclass(frozen=True, kw_only=True)
class Operator:
    """One step of a flow.

    Attributes:
        kind: ``map``, ``filter``, ``flat_map``, ``key_by``, ``reduce`` or ``stateful_map``.
        fn: the user function.
        name: namespace of the operator's state (stateful operators); keep it stable across
            versions of the flow so their checkpoints still match.
        initial: factory of the initial state of a key (stateful operators).
    """

    kind: str
    fn: Callable[..., Any]
    name: str = ""
    initial: Callable[[], Any] = field(default=lambda: None)

    @property
    def stateful(self) -> bool:
        return self.kind in ("reduce", "stateful_map")


class Flow:
    """A named pipeline. The name is part of every task id: keep it stable.

    Args:
        name: flow name.
    """

    def __init__(self, name: str) -> None:
        if not name or ":" in name:
            raise ConfigurationError(f"flow name {name!r} must be non-empty and without ':'")
        self.name = name
        self._source: Source | None = None
        self.operators: list[Operator] = []
        self._sink: Sink | None = None
        self.keyed = False

    @property
    def source_(self) -> Source:
        if self._source is None:
            raise ConfigurationError(f"flow {self.name!r} has no source; call flow.source(...)")
        return self._source

    @property
    def sink_(self) -> Sink:
        if self._sink is None:
            raise ConfigurationError(
                f"flow {self.name!r} has no sink; end the chain with .sink(...)"
            )
        return self._sink

    def source(self, source: Source) -> Stream:
        """Start the flow at ``source``; one task runs per partition of it."""
        if self._source is not None:
            raise ConfigurationError(f"flow {self.name!r} already has a source")
        self._source = source
        return Stream(self)

    def validate(self) -> None:
        """Fail with a ``ConfigurationError`` unless the flow can run."""
        _ = self.source_, self.sink_

    def __repr__(self) -> str:
        chain = " -> ".join(op.kind for op in self.operators)
        return f"Flow({self.name!r}: {self._source!r} -> {chain} -> {self._sink!r})"


class Stream:
    """The open end of a flow under construction; every method returns the stream."""

    def __init__(self, flow: Flow) -> None:
        self._flow = flow

    def _add(self, op: Operator) -> Stream:
        if self._flow._sink is not None:
            raise ConfigurationError(f"flow {self._flow.name!r} already ends in a sink")
        self._flow.operators.append(op)
        return self

    def _state_name(self, kind: str, name: str | None) -> str:
        if name is None:
            index = sum(1 for op in self._flow.operators if op.stateful)
            return f"{kind}{index}"
        taken = {op.name for op in self._flow.operators if op.stateful}
        if name in taken or not name:
            raise ConfigurationError(f"state name {name!r} is empty or used twice in the flow")
        return name

    def map(self, fn: Callable[[Any], Any]) -> Stream:
        """Replace each value with ``fn(value)``."""
        return self._add(Operator(kind="map", fn=fn))

    def filter(self, fn: Callable[[Any], bool]) -> Stream:
        """Keep the values for which ``fn(value)`` is true."""
        return self._add(Operator(kind="filter", fn=fn))

    def flat_map(self, fn: Callable[[Any], Iterable[Any]]) -> Stream:
        """Replace each value with every item of ``fn(value)``."""
        return self._add(Operator(kind="flat_map", fn=fn))

    def key_by(self, fn: Callable[[Any], Any]) -> Stream:
        """Key each value by ``fn(value)`` (a string, number, or list of them)."""
        self._flow.keyed = True
        return self._add(Operator(kind="key_by", fn=fn))

    def reduce(self, fn: Callable[[Any, Any], Any], *, initial: Any = None,
               name: str | None = None) -> Stream:
        """Keyed running aggregate: ``state = fn(state, value)``; emits ``(key, state)``.

        ``fn`` must return a new value rather than change ``state`` in place, so that a record
        retried after a failure is applied once. State must be JSON-compatible.
        """
        self._require_key("reduce")
        return self._add(Operator(kind="reduce", fn=fn, name=self._state_name("reduce", name),
                                  initial=_factory(initial)))

    def stateful_map(self, fn: Callable[[Any, Any], tuple[Any, Any]], *, initial: Any = None,
                     name: str | None = None) -> Stream:
        """Keyed map with user state: ``new_state, out = fn(state, value)``; emits ``out``.

        ``state`` is ``initial`` for a new key. Return ``None`` as ``new_state`` to delete the
        key's state. As with ``reduce``, do not change ``state`` in place.
        """
        self._require_key("stateful_map")
        return self._add(Operator(kind="stateful_map", fn=fn,
                                  name=self._state_name("stateful_map", name),
                                  initial=_factory(initial)))

    def sink(self, sink: Sink) -> Flow:
        """End the flow in ``sink``."""
        if self._flow._sink is not None:
            raise ConfigurationError(f"flow {self._flow.name!r} already ends in a sink")
        self._flow._sink = sink
        return self._flow

    def _require_key(self, what: str) -> None:
        if not self._flow.keyed:
            raise ConfigurationError(f"{what} keeps state per key: call .key_by(...) before it")


def _factory(initial: Any) -> Callable[[], Any]:
    if isinstance(initial, _IMMUTABLE):
        return lambda: initial
    return lambda: copy.deepcopy(initial)
