"""The checker: committed output and state of a faulty schedule against a fault-free run.

Under exactly-once the visible output of every task must equal the reference, item for item
and in order; under at-least-once the output of the commits the store accepted must equal the
reference, and every other item (output written before a commit that never landed: the replay
window) is counted as a duplicate. Committed keyed state and dead letters must equal the
reference under both guarantees, and every task's committed position must be the end of its
input. Differences are reported by kind: ``lost``, ``duplicated``, ``output_mismatch`` (same
items, other order), ``state_mismatch``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .._codec import decode, encode
from ._observe import ObservedStore, Violation
from ._sink import MemorySink
from ._store import MemoryStore

__all__ = ["Outcome", "compare", "outcome"]


@dataclass(kw_only=True)
class Outcome:
    """What a run left durable, per task.

    Attributes:
        output: committed output items.
        dead: dead letters as ``(position, kind, record)``.
        state: committed keyed state, encoded key -> encoded value.
        positions: committed position of each task's partition.
        duplicates: at-least-once output items written by commits that never landed.
    """

    output: dict[str, list[Any]] = field(default_factory=dict)
    dead: dict[str, list[Any]] = field(default_factory=dict)
    state: dict[str, dict[bytes, bytes]] = field(default_factory=dict)
    positions: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0


def outcome(*, tasks: dict[str, str], guarantee: str, sink: MemorySink, dead: MemorySink,
            store: MemoryStore, observed: ObservedStore) -> Outcome:
    """Read what a run left in its sinks and store (``tasks``: partition -> task id)."""
    result = Outcome()
    status = {s.task: s for s in store.tasks()}
    for partition, task in tasks.items():
        accepted = observed.accepted(task)
        result.output[task] = _committed(sink, "out", task, guarantee, accepted, result)
        letters = _committed(dead, "dead", task, guarantee, accepted, result)
        result.dead[task] = [(e["position"], e["kind"], e["record"]) for e in letters]
        result.state[task] = store.snapshot(task) if task in status else {}
        record = status[task].record if task in status else None
        result.positions[task] = int(record.positions.get(partition) or 0) if record else 0
    return result


def _committed(sink: MemorySink, sink_id: str, task: str, guarantee: str,
               accepted: list[Any], result: Outcome) -> list[Any]:
    if task not in sink.tasks():
        return []
    if guarantee == "exactly-once":
        return sink.output(task)
    landed = set()
    for record in accepted:
        meta = record.sink_txn.get(sink_id)
        if meta is not None:
            landed.add((meta["writer"], meta["seq"]))
    out: list[Any] = []
    for entry in sink.entries(task):
        if (entry.writer, entry.seq) in landed:
            out.extend(entry.items)
        else:
            result.duplicates += len(entry.items)
    return out


def compare(reference: Outcome, actual: Outcome, ends: dict[str, int]) -> list[Violation]:
    """Every difference between ``actual`` and ``reference`` (``ends``: task -> input size)."""
    found: list[Violation] = []
    for task, end in ends.items():
        position = actual.positions.get(task, 0)
        if position != end:
            found.append(Violation(kind="lost", task=task, detail=(
                f"committed position {position} but the input has {end} records")))
        found += _diff("output", task, reference.output.get(task, []),
                       actual.output.get(task, []))
        found += _diff("dead letters", task, reference.dead.get(task, []),
                       actual.dead.get(task, []))
        found += _diff_state(task, reference.state.get(task, {}), actual.state.get(task, {}))
    return found


def _diff(what: str, task: str, expected: list[Any], actual: list[Any]) -> list[Violation]:
    if expected == actual:
        return []
    want = Counter(encode(x) for x in expected)
    got = Counter(encode(x) for x in actual)
    found = []
    lost, extra = want - got, got - want
    if lost:
        found.append(Violation(kind="lost", task=task, detail=(
            f"{sum(lost.values())} {what} item(s) of the reference are missing, e.g. "
            f"{_sample(lost)}")))
    if extra:
        found.append(Violation(kind="duplicated", task=task, detail=(
            f"{sum(extra.values())} {what} item(s) more than the reference, e.g. "
            f"{_sample(extra)}")))
    if not found:
        first = next(i for i, (a, b) in enumerate(zip(expected, actual, strict=True)) if a != b)
        found.append(Violation(kind="output_mismatch", task=task, detail=(
            f"{what} has the reference's items in another order from item {first}: "
            f"expected {expected[first]!r}, found {actual[first]!r}")))
    return found


def _diff_state(task: str, expected: dict[bytes, bytes],
                actual: dict[bytes, bytes]) -> list[Violation]:
    if expected == actual:
        return []
    keys = sorted(set(expected) | set(actual))
    wrong = [k for k in keys if expected.get(k) != actual.get(k)]
    shown = ", ".join(
        f"{_show(k)}: expected {_show(expected.get(k))}, found {_show(actual.get(k))}"
        for k in wrong[:3])
    return [Violation(kind="state_mismatch", task=task,
                      detail=f"{len(wrong)} key(s) differ from the reference: {shown}")]


def _show(raw: bytes | None) -> str:
    if raw is None:
        return "(none)"
    text = raw.split(b"\x00", 1)[-1]
    try:
        return repr(decode(text))
    except Exception:
        return repr(raw)


def _sample(counter: Counter[bytes]) -> str:
    return ", ".join(item.decode() for item in list(counter)[:3])
