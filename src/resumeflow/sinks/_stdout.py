"""Standard-output sink: at-least-once by nature (a printed line cannot be taken back).

Output is written and flushed at pre-commit, before the commit point; a crash after that and
before the commit prints the replayed records again.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, TextIO

import msgspec

from ..checkpoint import StagedEntry
from ._base import Precommit, SinkContext

__all__ = ["Stdout"]

_encoder = msgspec.json.Encoder()


class Stdout:
    """Print each item as a JSON line (keyed items as ``{"key": k, "value": v}``)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.name = "stdout"
        self._stream = stream

    def open(self, ctx: SinkContext) -> _StdoutWriter:
        return _StdoutWriter(self._stream or sys.stdout, keyed=ctx.keyed)

    def __repr__(self) -> str:
        return "Stdout()"


class _StdoutWriter:
    def __init__(self, stream: TextIO, *, keyed: bool) -> None:
        self.buffer: list[Any] = []
        self._stream = stream
        self._keyed = keyed

    def recover(self, meta: dict[str, Any] | None, staged: Sequence[StagedEntry]) -> None:
        return None

    def precommit(self, seq: int) -> Precommit:
        if self.buffer:
            items = self.buffer
            if self._keyed:
                items = [{"key": k, "value": v} for k, v in items]
            self._stream.write(_encoder.encode_lines(items).decode())
            self._stream.flush()
            self.buffer.clear()
        return Precommit()

    def finalize(self, seq: int) -> None:
        return None

    def releasable(self) -> int | None:
        return None

    def close(self) -> None:
        return None
