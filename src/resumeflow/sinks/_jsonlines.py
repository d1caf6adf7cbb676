"""JSON-lines file sink, exactly-once by staging.

Under exactly-once, each checkpoint's output is staged in the store inside the commit, then
appended to the file after the commit point. The file's length tells whether an append
happened: finalizing ``seq`` when the file already ends at its recorded end does nothing, a
half-done append is cut back and redone. So a crash anywhere leaves each record in the file
exactly once after recovery, and readers never see output of an uncommitted checkpoint.
Under at-least-once, output is appended before the commit point and a replay repeats it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec

from ..checkpoint import StagedEntry
from ..errors import ConfigurationError, DataError, invariant
from ._base import Precommit, SinkContext

__all__ = ["JsonLinesSink"]

log = logging.getLogger("resumeflow.sinks")

_encoder = msgspec.json.Encoder()
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class JsonLinesSink:
    """Write each item as one JSON line.

    Args:
        path: output file. With a multi-partition source, include ``{partition}`` in it:
            each task owns one file.
        with_key: for keyed streams, write ``{"key": k, "value": v}`` (default) or only ``v``.
    """

    def __init__(self, path: str | os.PathLike[str], *, with_key: bool = True) -> None:
        self.path = str(path)
        self.with_key = with_key
        self.name = f"jsonl:{self.path}"

    def open(self, ctx: SinkContext) -> _JsonLinesWriter:
        if "{partition}" in self.path:
            path = Path(self.path.replace("{partition}", _SAFE.sub("_", ctx.partition)))
        elif ctx.partitions > 1:
            raise ConfigurationError(
                f"JsonLinesSink({self.path!r}) serves {ctx.partitions} partitions but one file "
                "belongs to one task: put '{partition}' in the path, e.g. 'out/{partition}.jsonl'"
            )
        else:
            path = Path(self.path)
        if not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
        return _JsonLinesWriter(path, ctx, with_key=self.with_key)

    def __repr__(self) -> str:
        return f"JsonLinesSink({self.path!r})"


class _JsonLinesWriter:
    def __init__(self, path: Path, ctx: SinkContext, *, with_key: bool) -> None:
        self.path = path
        self.ctx = ctx
        self.buffer: list[Any] = []
        self._wrap = ctx.keyed and with_key
        self._unwrap = ctx.keyed and not with_key
        self._exactly_once = ctx.guarantee == "exactly-once"
        self._length = 0
        self._pending: dict[int, tuple[dict[str, Any], bytes]] = {}
        self._finalized: int | None = None
        self._unsynced = False
        try:
            self._file = open(path, "ab+")  # noqa: SIM115 - closed in close()
        except OSError as exc:
            raise ConfigurationError(
                f"cannot open output file {str(path)!r}: {exc.strerror}; check the path"
            ) from exc

    # -- recovery --------------------------------------------------------------------------

    def recover(self, meta: dict[str, Any] | None, staged: Sequence[StagedEntry]) -> None:
        size = self._size()
        if not self._exactly_once:
            self._length = size
            return
        if meta is None:
            if size:
                raise ConfigurationError(
                    f"output file {str(self.path)!r} already holds {size} bytes but the store "
                    "has no checkpoint that wrote them; move the file away or run with the "
                    "store that wrote it"
                )
            return
        with self._locked():
            for entry in staged:
                self._append(entry.seq, entry.meta, entry.payload)
                self._finalized = entry.seq
            self._cut_back(int(meta["end"]))
        self._length = int(meta["end"])

    def _cut_back(self, end: int) -> None:
        size = self._size()
        if size > end:
            log.warning("%s: cutting %d bytes written after the checkpoint being resumed",
                        self.path, size - end)
            os.truncate(self.path, end)
        elif size < end:
            raise DataError(
                f"output file {str(self.path)!r} is {size} bytes but checkpoint output ends at "
                f"byte {end}: it was truncated outside resumeflow. Restore it, or rewind the "
                "task with `resumeflow checkpoints rewind`"
            )
        self._sync()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialize appends with any other writer of this file (a zombie finalizing late)."""
        fcntl.flock(self._file.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)

    # -- the checkpoint --------------------------------------------------------------------

    def _encode(self) -> bytes:
        items = self.buffer
        if self._wrap:
            items = [{"key": k, "value": v} for k, v in items]
        elif self._unwrap:
            items = [v for _, v in items]
        try:
            return _encoder.encode_lines(items)
        except TypeError as exc:
            raise DataError(
                f"output for {str(self.path)!r} is not JSON-serializable ({exc}); emit dicts, "
                "lists, strings and numbers"
            ) from exc

    def precommit(self, seq: int) -> Precommit:
        payload = self._encode() if self.buffer else b""
        self.buffer.clear()
        base = self._length
        meta = {"file": str(self.path), "base": base, "end": base + len(payload)}
        self._length = base + len(payload)
        if not self._exactly_once:
            if payload:
                self._file.write(payload)
                self._file.flush()
                os.fsync(self._file.fileno())
            return Precommit(meta=meta)
        if not payload:
            return Precommit(meta=meta)
        self._pending[seq] = (meta, payload)
        return Precommit(meta=meta, staged=StagedEntry(sink=self.ctx.sink_id, seq=seq,
                                                       meta=meta, payload=payload))

    def finalize(self, seq: int) -> None:
        pending = self._pending.pop(seq, None)
        if pending is None:
            return
        meta, payload = pending
        with self._locked():
            self._append(seq, meta, payload)
        self._finalized = seq

    def _append(self, seq: int, meta: dict[str, Any], payload: bytes) -> None:
        base, end = int(meta["base"]), int(meta["end"])
        size = self._size()
        if size == end:
            return
        if size < base:
            raise DataError(
                f"output file {str(self.path)!r} is {size} bytes but checkpoint {seq} appends "
                f"at byte {base}: it was truncated outside resumeflow; restore it"
            )
        invariant(size <= end, f"{self.path}: {size} bytes, past checkpoint {seq}'s end {end}")
        if size != base:
            os.truncate(self.path, base)
        self._file.seek(0, os.SEEK_END)
        from .._faults import crash_point

        half = len(payload) // 2
        self._file.write(payload[:half])
        self._file.flush()
        crash_point("sink.finalize.partial")
        self._file.write(payload[half:])
        self._file.flush()
        self._unsynced = True

    def releasable(self) -> int | None:
        if self._unsynced:
            self._sync()
        return self._finalized

    def _sync(self) -> None:
        os.fsync(self._file.fileno())
        self._unsynced = False

    def _size(self) -> int:
        return os.fstat(self._file.fileno()).st_size

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
