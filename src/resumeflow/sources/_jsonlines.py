"""JSON-lines files: one partition per file, the position is the byte offset of the next line.

A line is consumed only once its terminating newline is there, so a file that is still being
written is never read half-way through a line: the partial line is read when it is complete.
Blank lines are skipped. A line that is not valid JSON fails in ``decode`` and is dead-lettered
by the runtime with its byte offset; it does not stop the partition.
"""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path
from typing import Any

import msgspec

from ..errors import ConfigurationError
from ._base import Batch

__all__ = ["JsonLines", "JsonLinesDir"]

log = logging.getLogger("resumeflow.sources")

_CHUNK_BYTES = 1 << 20


class _FileReader:
    """Reads complete lines of one file from a byte offset."""

    def __init__(self, path: Path, position: int, *, follow: bool) -> None:
        self.path = path
        self.position = position
        self._follow = follow
        self._at_end = False
        self._warned_partial = False
        try:
            self._file = open(path, "rb")  # noqa: SIM115 - closed in close()
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read source file {str(path)!r}: {exc.strerror}; check the path"
            ) from exc
        size = os.fstat(self._file.fileno()).st_size
        if position > size:
            raise ConfigurationError(
                f"source file {str(path)!r} is {size} bytes but the checkpoint resumes at byte "
                f"{position}: the file was truncated or replaced. Restore it, or rewind the "
                "task with `resumeflow checkpoints rewind`"
            )
        self._file.seek(position)
        self._buf = b""

    @property
    def at_end(self) -> bool:
        return self._at_end

    def read(self, max_records: int) -> Batch | None:
        buf = self._buf
        if len(buf) < _CHUNK_BYTES // 2 or b"\n" not in buf:
            more = self._file.read(_CHUNK_BYTES)
            while more and b"\n" not in more:  # a line longer than a chunk: read on
                buf += more
                more = self._file.read(_CHUNK_BYTES)
            if more:
                buf += more
            elif b"\n" not in buf:
                self._reached_eof(buf)
                return None
        parts = buf.split(b"\n", max_records)
        rest = parts.pop()
        if not parts:
            self._buf = buf
            return None
        lines = parts
        start = self.position
        used = len(buf) - len(rest)
        self._buf = rest
        self.position = start + used
        if not all(map(bytes.strip, lines)):
            # Blank lines, whitespace-only ones included, are skipped: exactly the lines
            # ``_locate`` skips, so a record's index maps to its own byte offset.
            lines = [line for line in lines if line.strip()]
        return Batch(items=lines, start=start, end=self.position,
                     locate=lambda i: _locate(buf, used, start, i))

    def _reached_eof(self, buf: bytes) -> None:
        self._buf = buf
        if self._follow:
            return
        self._at_end = True
        if buf and not self._warned_partial:
            self._warned_partial = True
            log.warning(
                "source file %s ends with %d bytes of an unterminated line at byte %d; it is "
                "left unread and will be read once its newline is written",
                self.path, len(buf), self.position,
            )

    def close(self) -> None:
        self._file.close()


def _locate(buf: bytes, used: int, start: int, index: int) -> int:
    offset = 0
    seen = 0
    for line in buf[:used].split(b"\n"):
        if line.strip():
            if seen == index:
                return start + offset
            seen += 1
        offset += len(line) + 1
    raise IndexError(index)


_decoder = msgspec.json.Decoder()


class JsonLines:
    """One JSON-lines file as a source with a single partition.

    Args:
        path: the file.
        name: source name used in task ids (default: the file name). Keep it stable: the
            checkpoint of a task is found by its id.
    """

    def __init__(self, path: str | os.PathLike[str], *, name: str | None = None) -> None:
        self.path = Path(path)
        self.name = name or self.path.name

    def partitions(self) -> list[str]:
        _check_readable(self.path)
        return ["0"]

    def open(self, partition: str, position: Any | None, *, follow: bool) -> _FileReader:
        return _FileReader(self.path, int(position or 0), follow=follow)

    def decode(self, raw: bytes) -> Any:
        return _decoder.decode(raw)

    def __repr__(self) -> str:
        return f"JsonLines({str(self.path)!r})"


class JsonLinesDir:
    """JSON-lines files matching a glob pattern; one partition per file, named by file name.

    The set of files is fixed when the pipeline starts.
    """

    def __init__(self, pattern: str, *, name: str | None = None) -> None:
        self.pattern = pattern
        self.name = name or pattern
        self._files: dict[str, Path] = {}

    def partitions(self) -> list[str]:
        paths = sorted(Path(p) for p in glob.glob(self.pattern))
        if not paths:
            raise ConfigurationError(
                f"no file matches {self.pattern!r}; check the pattern or create the input files"
            )
        files: dict[str, Path] = {}
        for path in paths:
            if path.name in files:
                raise ConfigurationError(
                    f"{self.pattern!r} matches two files named {path.name!r}; partitions are "
                    "named by file name, so narrow the pattern"
                )
            _check_readable(path)
            files[path.name] = path
        self._files = files
        return list(files)

    def open(self, partition: str, position: Any | None, *, follow: bool) -> _FileReader:
        if not self._files:
            self.partitions()
        try:
            path = self._files[partition]
        except KeyError:
            raise ConfigurationError(
                f"partition {partition!r} of {self.pattern!r} is gone: its file was removed or "
                "renamed; restore it"
            ) from None
        return _FileReader(path, int(position or 0), follow=follow)

    def decode(self, raw: bytes) -> Any:
        return _decoder.decode(raw)

    def __repr__(self) -> str:
        return f"JsonLinesDir({self.pattern!r})"


def _check_readable(path: Path) -> None:
    if not path.is_file():
        raise ConfigurationError(f"source file {str(path)!r} does not exist; check the path")
    if not os.access(path, os.R_OK):
        raise ConfigurationError(
            f"source file {str(path)!r} is not readable; fix its permissions"
        )
