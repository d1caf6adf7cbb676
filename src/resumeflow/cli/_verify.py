"""Walk a task's chain of commit records and name every break in it."""

from __future__ import annotations

from typing import Any

from ..checkpoint import decode_record
from ..errors import CorruptCheckpointError

__all__ = ["verify_chain"]


def verify_chain(task: str, records: list[tuple[int, bytes]]) -> list[str]:
    """Problems found in the kept records of ``task``, oldest first; empty when sound.

    Each record must decode and match its digest, carry the task and seq it is stored
    under, link to the digest of the record before it, and neither lower the epoch nor move
    any position backwards.
    """
    problems: list[str] = []
    previous: Any = None
    for seq, raw in records:
        try:
            record = decode_record(raw)
        except CorruptCheckpointError as exc:
            problems.append(f"seq {seq}: {exc}")
            previous = None
            continue
        if record.seq != seq or record.task != task:
            problems.append(f"seq {seq}: record names task {record.task!r} seq {record.seq}")
        if previous is not None:
            if previous.seq + 1 == record.seq and record.prev_digest != previous.digest:
                problems.append(f"seq {seq}: prev_digest does not match seq {previous.seq}")
            if previous.seq + 1 != record.seq:
                problems.append(f"seq {seq}: follows seq {previous.seq} (gap)")
            if record.epoch < previous.epoch:
                problems.append(f"seq {seq}: epoch {record.epoch} below {previous.epoch}")
            for part, pos in previous.positions.items():
                new = record.positions.get(part)
                if isinstance(pos, int) and isinstance(new, int) and new < pos:
                    problems.append(f"seq {seq}: position of {part!r} went back {pos} -> {new}")
        previous = record
    return problems
