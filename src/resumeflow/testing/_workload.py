"""The simulator's own workload: a seed draws inputs and one of several flow shapes.

Shapes cover every operator: stateless chains (``map``, ``filter``, ``flat_map``), a keyed
``reduce``, a ``stateful_map`` that deletes its state, two stateful operators with a re-key
between them, and poison records that user code always rejects (dead-lettered).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from ..flow import Flow, Stream
from ._sink import MemorySink
from ._source import MemorySource

__all__ = ["SHAPES", "workload"]


def _admit(event: dict[str, Any]) -> dict[str, Any]:
    if event.get("poison"):
        raise ValueError(f"poison record {event['id']}")
    return event


def _sum(stream: Stream) -> None:
    stream.key_by(lambda e: e["k"]).reduce(lambda total, e: total + e["v"], initial=0)


def _stateless(stream: Stream) -> None:
    (stream.filter(lambda e: e["v"] >= 0)
           .flat_map(lambda e: [e["v"]] * (e["v"] % 3))
           .map(lambda v: {"double": v * 2}))


def _session(e_state: int, event: dict[str, Any]) -> tuple[Any, Any]:
    count = e_state + 1
    if count >= 3:
        return None, ["flush", event["id"], count]
    return count, ["hold", event["id"], count]


def _sessions(stream: Stream) -> None:
    stream.key_by(lambda e: e["k"]).stateful_map(_session, initial=0)


def _two_stage(stream: Stream) -> None:
    (stream.key_by(lambda e: e["k"])
           .reduce(lambda total, e: total + e["v"], initial=0, name="totals")
           .key_by(lambda total: total % 3)
           .reduce(lambda n, _: n + 1, initial=0, name="buckets"))


def _history(stream: Stream) -> None:
    stream.key_by(lambda e: [e["k"], e["v"] % 2]).reduce(
        lambda seen, e: [*seen[-3:], e["id"]], initial=[])


SHAPES: dict[str, Callable[[Stream], None]] = {
    "sum": _sum,
    "stateless": _stateless,
    "sessions": _sessions,
    "two-stage": _two_stage,
    "history": _history,
}
"""Flow shapes by name; each takes the stream after the poison check."""


def workload(seed: int) -> tuple[str, Callable[[MemorySource, MemorySink], Flow],
                                  dict[str, list[Any]]]:
    """The shape name, flow builder and inputs that ``seed`` draws."""
    rng = random.Random(seed ^ 0x5F3759DF)
    name = rng.choice(sorted(SHAPES))
    shape = SHAPES[name]
    poison_rate = rng.choice([0.0, 0.0, 0.03])
    keys = "abcdefg"[: rng.randrange(1, 8)]
    inputs: dict[str, list[Any]] = {}
    for p in range(rng.choice([1, 1, 2, 3])):
        records: list[Any] = []
        for i in range(rng.randrange(0, 48)):
            event: dict[str, Any] = {"id": f"{p}-{i}", "k": rng.choice(keys),
                                     "v": rng.randint(-3, 9)}
            if rng.random() < poison_rate:
                event["poison"] = True
            records.append(event)
        inputs[f"p{p}"] = records

    def build(source: MemorySource, sink: MemorySink) -> Flow:
        flow = Flow(f"sim-{name}")
        stream = flow.source(source).map(_admit)
        shape(stream)
        return stream.sink(sink)

    return name, build, inputs
