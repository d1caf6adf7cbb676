"""The runtime: opens every task of a flow, runs them round-robin, commits each on its bound.

``run()`` returns after the final commit once every bounded input is read (or after a stop
request: SIGTERM or SIGINT drain the current batch and commit). Whatever kills the process
instead, the next ``run()`` on the same store resumes every task from its last commit record.
"""

from __future__ import annotations

import logging
import random
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from .._faults import install_from_env
from ..checkpoint import SQLiteStore, Store
from ..errors import ConfigurationError, UnavailableError
from ..flow import Flow
from ..sinks import JsonLinesSink, Sink
from ._config import RunConfig
from ._progress import ProgressMarks
from ._task import Recovery, TaskRunner

__all__ = ["Progress", "RunSummary", "Runtime", "run"]

log = logging.getLogger("resumeflow.runtime")


@dataclass(frozen=True, kw_only=True)
class Progress:
    """A snapshot for progress displays."""

    records_in: int
    records_per_s: float
    last_commit_age_s: float | None
    commits: int


@dataclass(kw_only=True)
class RunSummary:
    """What one ``run()`` did."""

    recoveries: list[Recovery] = field(default_factory=list)
    records_in: int = 0
    records_replayed: int = 0
    commits: int = 0
    commit_s: list[float] = field(default_factory=list)
    dead_letters: int = 0
    restarts: int = 0
    elapsed_s: float = 0.0
    time_to_first_record_s: float | None = None
    stopped_by: str | None = None

    @property
    def commit_p50_s(self) -> float:
        return statistics.median(self.commit_s) if self.commit_s else 0.0


class Runtime:
    """Runs a flow against a store.

    Args:
        flow: the flow.
        store: a store, or the path of a SQLite store.
        config: bounds and guarantee.
        dead_letters: dead-letter sink (default: JSON lines next to the store).
        progress: called about twice a second with a ``Progress``.
    """

    def __init__(self, flow: Flow, store: Store | str | Path, config: RunConfig | None = None,
                 *, dead_letters: Sink | None = None,
                 progress: Callable[[Progress], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        flow.validate()
        self.flow = flow
        self.config = config or RunConfig()
        self._owns_store = not hasattr(store, "open_task")
        if isinstance(store, (str, Path)):
            store = SQLiteStore(store, keep_checkpoints=self.config.keep_checkpoints)
        self.store: Store = store
        self._store_path = getattr(store, "database_path", None)
        self._dead = dead_letters or self._default_dead_letters()
        self._progress = progress
        self._clock = clock
        self._stop = threading.Event()
        self._stopped_by: str | None = None
        self.tasks: list[TaskRunner] = []
        self._partitions: list[str] = []
        self._marks: ProgressMarks | None = None
        self._rng = random.Random(self.config.seed)
        self._failures: dict[str, int] = {}
        self._sleep = sleep
        install_from_env()

    def _default_dead_letters(self) -> Sink:
        if self.config.dead_letter_path:
            return JsonLinesSink(self.config.dead_letter_path)
        path = getattr(self.store, "path", None)
        if path is None:
            raise ConfigurationError(
                "this store has no file path for dead letters: pass dead_letters=... or "
                "RunConfig(dead_letter_path=...)"
            )
        return JsonLinesSink(f"{path}.deadletters/{{partition}}.jsonl")

    def open(self) -> list[Recovery]:
        """Take every task and recover it; logs one line per task."""
        partitions = self.flow.source_.partitions()
        self._partitions = partitions
        path = getattr(self.store, "path", None)
        if path is not None:
            self._marks = ProgressMarks(Path(f"{path}.progress"))
        recoveries = []
        for partition in partitions:
            task = self._make_task(partition)
            recovery = task.open()
            log.info("%s", recovery.line())
            self.tasks.append(task)
            recoveries.append(recovery)
        return recoveries

    def _make_task(self, partition: str) -> TaskRunner:
        return TaskRunner(flow=self.flow, partition=partition,
                          partitions=len(self._partitions), store=self.store,
                          config=self.config, dead_letters=self._dead, marks=self._marks,
                          clock=self._clock, rng=self._rng, store_path=self._store_path)

    def _restart(self, index: int, failure: UnavailableError, summary: RunSummary) -> None:
        """Replace a task that hit a transient failure by a fresh one on its last checkpoint,
        after a capped, fully jittered backoff; fails the run past ``restart_budget``."""
        old = self.tasks[index]
        try:
            old.close()
        except Exception:
            log.exception("closing task %s after a failure failed", old.task_id)
        while True:
            count = self._failures.get(old.partition, 0) + 1
            self._failures[old.partition] = count
            if count > self.config.restart_budget:
                raise failure
            cap = min(self.config.restart_backoff_max_s,
                      self.config.restart_backoff_base_s * 2 ** (count - 1))
            delay = self._rng.uniform(0, cap)
            summary.restarts += 1
            log.warning("task %s: %s; restarting it from its last checkpoint in %.2f s "
                        "(restart %d of at most %d in a row)", old.task_id, failure, delay,
                        count, self.config.restart_budget)
            self._sleep(delay)
            task = self._make_task(old.partition)
            try:
                log.info("%s", task.open().line())
            except UnavailableError as exc:
                failure = exc
                continue
            self.tasks[index] = task
            return

    def stop(self, reason: str = "stop requested") -> None:
        """Ask the run to finish its current batch, commit and return (thread-safe)."""
        self._stopped_by = reason
        self._stop.set()

    def run(self) -> RunSummary:
        """Run until every bounded input is done or a stop is requested."""
        started = self._clock()
        self._run_started = started
        summary = RunSummary()
        with self._signals():
            try:
                summary.recoveries = self.open() if not self.tasks else []
                while True:
                    self._loop(summary)
                    if self._commit_all(summary, force=True):
                        break
            finally:
                self._close()
        summary.elapsed_s = self._clock() - started
        summary.records_replayed = sum(t.records_replayed for t in self.tasks)
        firsts = [t.first_record_s for t in self.tasks if t.first_record_s is not None]
        summary.time_to_first_record_s = min(firsts) if firsts else None
        summary.stopped_by = self._stopped_by
        return summary

    def _loop(self, summary: RunSummary) -> None:
        tasks = self.tasks
        last_report = self._clock()
        while not self._stop.is_set():
            progressed = 0
            for index, task in enumerate(tasks):
                try:
                    n = task.step()
                    if task.commit_due():
                        self._commit(task, summary, wait=False)
                except UnavailableError as exc:
                    self._restart(index, exc, summary)
                    progressed += 1
                    continue
                progressed += n
                summary.records_in += n
                if n and not summary.records_in - n:
                    log.info("first records processed %.1f ms after the run started",
                             (self._clock() - self._run_started) * 1e3)
            if not progressed:
                if all(t.at_end for t in tasks):
                    return
                self._commit_all(summary, force=False)
                self._sleep(self.config.poll_interval_s)
            if self._progress is not None and self._clock() - last_report >= 0.5:
                last_report = self._clock()
                self._report(summary, last_report)

    def _commit(self, task: TaskRunner, summary: RunSummary, *, wait: bool = True) -> None:
        """Commit ``task`` (``wait=False``: pipelined, see ``TaskRunner.commit_async``); a
        commit that became durable resets the task's count of restarts in a row."""
        began = self._clock()
        durable = task.commit() if wait else task.commit_async()
        summary.commit_s.append(self._clock() - began)
        summary.commits += 1
        self._last_commit = self._clock()
        if durable is not None:
            self._failures.pop(task.partition, None)

    def _commit_all(self, summary: RunSummary, *, force: bool) -> bool:
        """Commit the tasks that are due (all with ``force``); False if one had to restart."""
        ok = True
        for index, task in enumerate(self.tasks):
            if task.has_uncommitted() and (force or task.commit_due()):
                try:
                    self._commit(task, summary)
                except UnavailableError as exc:
                    self._restart(index, exc, summary)
                    ok = False
        summary.dead_letters = sum(t.stats.get("dead_letters", 0) for t in self.tasks)
        return ok

    def _report(self, summary: RunSummary, now: float) -> None:
        assert self._progress is not None
        elapsed = max(now - getattr(self, "_run_started", now), 1e-9)
        last = getattr(self, "_last_commit", None)
        self._progress(Progress(records_in=summary.records_in,
                                records_per_s=summary.records_in / elapsed,
                                last_commit_age_s=None if last is None else now - last,
                                commits=summary.commits))

    def _close(self) -> None:
        for task in self.tasks:
            try:
                task.close()
            except Exception:
                log.exception("closing task %s failed", task.task_id)
        if self._marks is not None:
            self._marks.close()
            self._marks = None
        if self._owns_store:
            self.store.close()

    @contextmanager
    def _signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: FrameType | None) -> None:
            name = signal.Signals(signum).name
            log.warning("%s received: finishing the current batch and committing", name)
            self.stop(name)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def run(flow: Flow, store: Store | str | Path, config: RunConfig | None = None,
        **kwargs: Any) -> RunSummary:
    """Run ``flow`` on ``store`` until its inputs end; see ``Runtime``."""
    return Runtime(flow, store, config, **kwargs).run()
