"""The SQLite store's compactor in a process of its own.

A compactor thread shares the interpreter's lock with the pipeline: what it spends in Python
(decoding the deltas, merging them, building the statements) is time the main loop cannot
run, even with a core idle. In a process of its own the compaction runs beside the pipeline.
It is the same code (``_sqlite_state.serve``), on its own connection as the thread's is; the
two processes take turns at writing through SQLite's lock (a commit that waits sets a
``WaitingFlag``, and the compactor lets it go first), and the store's process keeps its index
of the tail, trimmed from the compactor's replies.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO

import msgspec

from . import _sqlite_state
from ._sqlite_state import Outstanding, TailIndex, WaitingFlag, compact_after, waiting_path

__all__ = ["ProcessCompactor"]

log = logging.getLogger("resumeflow.store")

_WAL = -1

# Loads only ``_sqlite_state`` (stdlib and msgspec), not the package: the process starts in
# a few tens of milliseconds. Once ``serve`` returns (its connection closed, its replies
# flushed) the process ends without the interpreter's teardown, which the store's ``close``
# would wait for: 14 ms, against 2 ms. A failure of ``serve`` ends it as usual (exit code 1).
_BOOT = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('_resumeflow_compactor', sys.argv[1])\n"
    "module = importlib.util.module_from_spec(spec)\n"
    "sys.modules[spec.name] = module\n"
    "spec.loader.exec_module(module)\n"
    "module.serve(sys.argv[2])\n"
    "import os\n"
    "os._exit(0)\n"
)

_decode = msgspec.json.Decoder(dict[str, object]).decode
_encode = msgspec.json.Encoder().encode


class _Idle:
    """``commit_waiting`` before the compactor process starts: nobody to tell."""

    def set(self) -> None:
        return None

    def clear(self) -> None:
        return None

    def is_set(self) -> bool:
        return False

    def held(self) -> bool:
        return False


class ProcessCompactor:
    """Runs compactions in a child process, one at a time, on request; the interface of
    ``Compactor``. The process starts at the first request and ends at ``close`` (or when
    this process dies: it reads its requests from a pipe).

    Args:
        path: the database file.
        recent: the store's index of uncompacted deltas (trimmed after each run).
        on_done: called after each run (to wake commits waiting for the tail to shrink).
    """

    def __init__(self, path: Path, recent: TailIndex, on_done: Callable[[], None]) -> None:
        self._path = path
        self._recent = recent
        self._on_done = on_done
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._waiting: WaitingFlag | None = None
        self._pending: set[int] = set()
        self._overlap: dict[int, float] = {}
        self._outstanding = Outstanding()
        self.runs = 0
        self.failures = 0

    @property
    def commit_waiting(self) -> WaitingFlag | _Idle:
        """Set by a commit while it waits for SQLite's write lock."""
        return self._waiting if self._waiting is not None else _Idle()

    def writing(self) -> bool:
        """Whether the compactor process holds SQLite's write lock (or is about to)."""
        waiting = self._waiting
        return waiting is not None and waiting.held()

    def compact_after(self, task_no: int) -> int:
        """Uncompacted deltas of ``task_no`` that start its next run (``compact_after``)."""
        return compact_after(self._overlap.get(task_no))

    def request(self, task_no: int, epoch: int) -> None:
        """Ask for a compaction of ``task_no`` (coalesced while one is waiting to start)."""
        with self._lock:
            if task_no in self._pending:
                return
            self._pending.add(task_no)
            for attempt in (1, 2):
                stdin = self._start()
                self._outstanding.add()  # before the reply can come
                try:
                    stdin.write(_encode([task_no, epoch]) + b"\n")
                    stdin.flush()
                    return
                except (BrokenPipeError, ValueError):
                    self._stop_locked()
                    if attempt == 2:
                        self._pending.discard(task_no)
                        log.warning("the compactor process of %s is gone; compaction of "
                                    "task #%d is left to the next request", self._path, task_no)

    def checkpoint_wal(self) -> None:
        """Ask for a checkpoint of the write-ahead log (coalesced while one is pending)."""
        self.request(_WAL, 0)

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait until every request made so far is served; False if ``timeout`` ran out."""
        return self._outstanding.wait(timeout)

    def close(self) -> None:
        """Let the process finish what it was asked and stop; uncompacted deltas stay
        readable. (A later request starts a new process.)"""
        with self._lock:
            self._stop_locked()
            if self._waiting is not None:
                self._waiting.close()
                self._waiting = None

    def _start(self) -> IO[bytes]:
        if self._proc is not None and self._proc.stdin is not None:
            return self._proc.stdin
        if self._waiting is None:
            self._waiting = WaitingFlag(waiting_path(self._path))
            self._waiting.clear()  # flags a killed process left set
            self._waiting.release()
        proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, _sqlite_state.__file__, str(self._path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        assert proc.stdin is not None and proc.stdout is not None
        self._proc = proc
        self._reader = threading.Thread(target=self._read, args=(proc.stdout,),
                                        name="resumeflow-compactor-replies", daemon=True)
        self._reader.start()
        return proc.stdin

    def _stop_locked(self) -> None:
        proc, reader = self._proc, self._reader
        self._proc = self._reader = None
        if proc is None:
            return
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        if reader is not None:
            reader.join()
        code = proc.wait()
        if code != 0:
            log.warning("the compactor process of %s ended with exit code %d; its deltas stay "
                        "readable", self._path, code)
        self._pending.clear()
        self._outstanding.reset()  # requests still queued were not started

    def _read(self, replies: IO[bytes]) -> None:
        try:
            for line in replies:
                try:
                    self._handle(_decode(line))
                except Exception:  # keep reading: a child that cannot write stops
                    log.exception("unreadable reply of the compactor process of %s: %r",
                                  self._path, line[:200])
        finally:
            replies.close()
            self._outstanding.reset()  # the process ended: it serves nothing more
            self._on_done()

    def _handle(self, reply: dict[str, object]) -> None:
        if "log" in reply:
            log.log(int(reply["log"]), "compactor: %s", reply["message"])  # type: ignore[call-overload]
            return
        task_no = int(reply["task"])  # type: ignore[call-overload]
        if "started" in reply:
            self._pending.discard(task_no)
            return
        self._outstanding.served()
        if task_no == _WAL:
            return
        if "entries" in reply and reply["keys"]:
            self._overlap[task_no] = int(reply["entries"]) / int(reply["keys"])  # type: ignore[call-overload]
        if "error" in reply:
            self.failures += 1
            log.error("compaction of task #%d failed; its deltas stay readable: %s",
                      task_no, reply["error"])
        elif "upto" in reply:
            self.runs += 1
            self._recent.trim(task_no, int(reply["upto"]))  # type: ignore[call-overload]
        self._on_done()
