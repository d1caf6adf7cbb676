"""Progress marks: how far each task had read, kept outside the commit (no fsync).

After a crash, the mark tells how many records the new run re-reads (the replay actually
paid), which the commit record alone cannot tell. Marks are advisory: a lost or stale mark
only makes the replay count unknown, never changes what is recovered.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgspec

__all__ = ["ProgressMarks"]

_SLOT = 256


class ProgressMarks:
    """One fixed-size slot per task in a side file next to the store."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    def read(self, task_no: int) -> Any:
        raw = os.pread(self._fd, _SLOT, task_no * _SLOT).rstrip(b" \x00\n")
        if not raw:
            return None
        try:
            return msgspec.json.decode(raw)
        except msgspec.DecodeError:
            return None

    def write(self, task_no: int, positions: Any) -> None:
        raw = msgspec.json.encode(positions)
        if len(raw) < _SLOT:
            os.pwrite(self._fd, raw.ljust(_SLOT - 1) + b"\n", task_no * _SLOT)

    def close(self) -> None:
        os.close(self._fd)
