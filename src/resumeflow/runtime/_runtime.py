"""The runtime: opens the tasks this worker holds, runs them round-robin, commits each on its
bound, and opens and closes tasks as its membership gains and loses partitions.

``run()`` returns after the final commit once every bounded input is read (or after a stop
request: SIGTERM or SIGINT drain the current batch and commit). With ``RunConfig(follow=True)``
inputs are never done, so the run ends only on a stop request: this is how a worker of a group
runs. Whatever kills the process instead, the next owner of each task (this worker restarted,
or another one of the group) resumes it from its last commit record.

A task gained is opened (``TaskRunner.open()``: a new epoch in the store fences the previous
owner) and resumes from its commit record; a task lost is committed if it can be and closed.
A commit refused with ``FencedError`` means another worker took the task: with a shared
membership the task is dropped quietly (counted in ``RunSummary.fenced``) and nothing of its
uncommitted work lands; with ``StaticMembership`` it fails the run, since no other worker
should exist.
"""

from __future__ import annotations

import logging
import random
import signal
import statistics
import sys
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
from ..errors import ConfigurationError, FencedError, UnavailableError
from ..flow import Flow
from ..sinks import JsonLinesSink, Sink
from ..sources import Source
from ._config import RunConfig
from ._membership import HandsOver, Membership, StaticMembership
from ._progress import ProgressMarks
from ._task import Recovery, TaskRunner

__all__ = ["Progress", "RunSummary", "Runtime", "run"]

log = logging.getLogger("resumeflow.runtime")

FENCED_RETAKE_S = (5.0, 60.0)
"""First and longest wait before a worker takes a fenced task again while its membership
still gives it the partition, doubling while the partition is fenced again before one of its
commits lands. A worker that truly lost the partition mostly hears so from its membership
meanwhile and lets it go; one that does not takes turns with the rightful owner, each take
fencing the other, until it does: safe whatever happens (each take is a new epoch and a
recovery from the last checkpoint), at the cost of replays."""


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
    """Checkpoints that became durable (a pipelined commit counts once it is, not when cut)."""
    commit_s: list[float] = field(default_factory=list)
    dead_letters: int = 0
    restarts: int = 0
    elapsed_s: float = 0.0
    time_to_first_record_s: float | None = None
    stopped_by: str | None = None
    rebalances: int = 0
    """Polls of the membership that gained or lost partitions."""
    tasks_gained: int = 0
    tasks_released: int = 0
    fenced: int = 0
    """Tasks dropped because another worker had taken them (their commit was refused)."""

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
        membership: which partitions this worker runs (default: the source's own, such as a
            Kafka consumer group, when it has one; else every partition). A membership shared
            with other workers needs ``RunConfig(follow=True)``: the worker runs until stopped.
    """

    def __init__(self, flow: Flow, store: Store | str | Path, config: RunConfig | None = None,
                 *, dead_letters: Sink | None = None,
                 progress: Callable[[Progress], None] | None = None,
                 membership: Membership | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        flow.validate()
        self.flow = flow
        self.config = config or RunConfig()
        self.membership: Membership = (_default_membership(flow.source_) if membership is None
                                       else membership)
        self._static = isinstance(self.membership, StaticMembership)
        if not self._static and not self.config.follow:
            raise ConfigurationError(
                f"{self.membership!r} shares the partitions with other workers, so this worker "
                "runs until it is stopped: set RunConfig(follow=True) (`resumeflow worker` "
                "does), or pass membership=StaticMembership() to read every partition to its "
                "end in this process"
            )
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
        self._retake: dict[str, float] = {}
        """Partitions whose task was fenced while the membership still gives them to this
        worker: when to take each again."""
        self._retake_wait: dict[str, float] = {}
        """The last wait before taking a fenced partition again (doubling while it is fenced
        again before a commit lands)."""
        self._sleep = sleep
        self._joined = False
        self._closing = False
        self._summary = RunSummary()
        self._retired_replayed = 0
        self._retired_commits = 0
        self._retired_first: list[float] = []
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
        """Join the membership and open the tasks it gives at once; logs one line per task.

        With ``StaticMembership`` that is every partition; a shared membership may give none
        yet (``run()`` opens the rest as they come).
        """
        partitions = self.flow.source_.partitions()
        self._partitions = partitions
        path = getattr(self.store, "path", None)
        if path is not None and self._marks is None:
            self._marks = ProgressMarks(Path(f"{path}.progress"))
        if isinstance(self.membership, HandsOver):
            self.membership.on_release(self._hand_over)
        self.membership.join(partitions)
        self._joined = True
        return self._rebalance(self._summary)

    def _make_task(self, partition: str) -> TaskRunner:
        return TaskRunner(flow=self.flow, partition=partition,
                          partitions=len(self._partitions), store=self.store,
                          config=self.config, dead_letters=self._dead, marks=self._marks,
                          clock=self._clock, rng=self._rng, store_path=self._store_path)

    # -- membership ------------------------------------------------------------------------

    def _rebalance(self, summary: RunSummary) -> list[Recovery]:
        """Apply what the membership gained and lost since its last poll."""
        gained, lost = self.membership.poll()
        if not gained and not lost:
            return []
        summary.rebalances += 1
        for partition in lost:
            self._retake.pop(partition, None)
            self._retake_wait.pop(partition, None)
            self._release(partition, summary)
        recoveries = []
        for partition in gained:
            self._retake.pop(partition, None)
            if self._held(partition) is not None:
                continue
            recovery = self._take(partition, summary)
            recoveries.append(recovery)
        log.info("rebalance: gained partitions %s, lost %s; now holding %s", _few(gained),
                 _few(lost), _few([t.partition for t in self.tasks]))
        return recoveries

    def _held(self, partition: str) -> TaskRunner | None:
        for task in self.tasks:
            if task.partition == partition:
                return task
        return None

    def _take(self, partition: str, summary: RunSummary) -> Recovery:
        """Open the task of a gained partition (a new epoch fences its previous owner)."""
        task = self._make_task(partition)
        try:
            recovery = task.open()
        except UnavailableError as exc:
            task, recovery = self._reopen(task, exc, summary)
        log.info("%s", recovery.line())
        self.tasks.append(task)
        summary.recoveries.append(recovery)
        summary.tasks_gained += 1
        return recovery

    def _release(self, partition: str, summary: RunSummary) -> None:
        """Commit the task of a lost partition if it still can, and close it."""
        task = self._held(partition)
        if task is None:
            return
        try:
            if task.has_uncommitted():
                self._commit(task, summary)
        except FencedError as exc:
            summary.fenced += 1
            log.warning("task %s: lost partition %s was already taken by another worker (%s); "
                        "its uncommitted records are replayed there", task.task_id, partition,
                        exc)
        except UnavailableError as exc:
            log.warning("task %s: could not commit lost partition %s (%s); the next owner "
                        "replays its uncommitted records", task.task_id, partition, exc)
        self._retire(task)
        summary.tasks_released += 1
        log.info("released task %s (partition %s)", task.task_id, partition)

    def _hand_over(self, partitions: list[str]) -> None:
        """Release handler given to a ``HandsOver`` membership: commit, then let go."""
        if self._closing:
            return
        for partition in partitions:
            self._release(partition, self._summary)

    def _drop_fenced(self, task: TaskRunner, exc: FencedError, summary: RunSummary) -> None:
        """A commit was refused: another worker took the task; stop running it here. If the
        membership still gives this worker the partition after a while, take it again: the
        worker that fenced this one may have been a zombie that restarted the task before it
        learnt it had lost the partition, and has let it go since (nobody else would run it)."""
        summary.fenced += 1
        partition = task.partition
        wait = min(self._retake_wait.get(partition, FENCED_RETAKE_S[0] / 2) * 2,
                   FENCED_RETAKE_S[1])
        self._retake_wait[partition] = wait
        self._retake[partition] = self._clock() + wait
        log.warning("task %s is fenced: %s; dropping it here, nothing of its uncommitted "
                    "work lands; taken again in %.0f s if the membership still gives "
                    "partition %s to this worker", task.task_id, exc, wait, partition)
        self._retire(task)

    def _retake_fenced(self, summary: RunSummary) -> None:
        """Take again the fenced partitions the membership still gives this worker, once
        their wait is over (the new epoch fences whoever ran them meanwhile)."""
        if not self._retake:
            return
        now = self._clock()
        for partition, due in list(self._retake.items()):
            if due > now:
                continue
            del self._retake[partition]
            if self._held(partition) is None:
                log.warning("taking partition %s again: its task was fenced %.0f s ago and "
                            "the membership still gives it to this worker", partition,
                            self._retake_wait.get(partition, 0.0))
                self._take(partition, summary)

    def _retire(self, task: TaskRunner) -> None:
        self.tasks.remove(task)
        self._retired_replayed += task.records_replayed
        self._retired_commits += task.commits_durable
        if task.first_record_s is not None:
            self._retired_first.append(task.first_record_s)
        try:
            task.close()
        except Exception:
            log.exception("closing task %s failed", task.task_id)

    # -- transient failures ----------------------------------------------------------------

    def _restart(self, task: TaskRunner, failure: UnavailableError, summary: RunSummary) -> None:
        """Replace a task that hit a transient failure by a fresh one on its last checkpoint."""
        index = self.tasks.index(task)
        try:
            task.close()
        except Exception:
            log.exception("closing task %s after a failure failed", task.task_id)
        self._retired_commits += task.commits_durable
        new, recovery = self._reopen(task, failure, summary)
        log.info("%s", recovery.line())
        self.tasks[index] = new

    def _reopen(self, old: TaskRunner, failure: UnavailableError,
                summary: RunSummary) -> tuple[TaskRunner, Recovery]:
        """Open ``old``'s partition again after a capped, fully jittered backoff; fails the run
        past ``restart_budget`` failures in a row."""
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
                recovery = task.open()
            except UnavailableError as exc:
                failure = exc
                continue
            return task, recovery

    def stop(self, reason: str = "stop requested") -> None:
        """Ask the run to finish its current batch, commit and return (thread-safe)."""
        self._stopped_by = reason
        self._stop.set()

    def run(self) -> RunSummary:
        """Run until every bounded input is done or a stop is requested."""
        started = self._clock()
        self._run_started = started
        summary = self._summary
        with self._signals(), _switch_interval(self.config.switch_interval_s):
            try:
                if not self._joined:
                    self.open()
                while True:
                    self._loop(summary)
                    if self._commit_all(summary, force=True):
                        break
            finally:
                self._close()
        summary.elapsed_s = self._clock() - started
        summary.commits = self._durable_commits()
        summary.records_replayed = self._retired_replayed + sum(
            t.records_replayed for t in self.tasks)
        firsts = self._retired_first + [
            t.first_record_s for t in self.tasks if t.first_record_s is not None]
        summary.time_to_first_record_s = min(firsts) if firsts else None
        summary.stopped_by = self._stopped_by
        return summary

    def _loop(self, summary: RunSummary) -> None:
        last_report = self._clock()
        while not self._stop.is_set():
            self._rebalance(summary)
            self._retake_fenced(summary)
            progressed = 0
            for task in list(self.tasks):  # a task may be replaced or dropped on the way
                try:
                    n = task.step()
                    if task.commit_due():
                        self._commit(task, summary, wait=False)
                except UnavailableError as exc:
                    self._restart(task, exc, summary)
                    progressed += 1
                    continue
                except FencedError as exc:
                    if self._static:
                        raise
                    self._drop_fenced(task, exc, summary)
                    continue
                progressed += n
                summary.records_in += n
                if n and not summary.records_in - n:
                    log.info("first records processed %.1f ms after the run started",
                             (self._clock() - self._run_started) * 1e3)
            if not progressed:
                if self._done():
                    return
                self._commit_all(summary, force=False)
                self._sleep(self.config.poll_interval_s)
            if self._progress is not None and self._clock() - last_report >= 0.5:
                last_report = self._clock()
                self._report(summary, last_report)

    def _done(self) -> bool:
        """A bounded run of every partition is done once each task read its input's end."""
        return self._static and not self.config.follow and all(t.at_end for t in self.tasks)

    def _durable_commits(self) -> int:
        return self._retired_commits + sum(t.commits_durable for t in self.tasks)

    def _commit(self, task: TaskRunner, summary: RunSummary, *, wait: bool = True) -> None:
        """Commit ``task`` (``wait=False``: pipelined, see ``TaskRunner.commit_async``). A
        commit that became durable resets the task's count of restarts in a row (the task
        itself gives its positions to the source as advice)."""
        began = self._clock()
        durable = task.commit() if wait else task.commit_async(alone=len(self.tasks) == 1)
        summary.commit_s.append(self._clock() - began)
        summary.commits = self._durable_commits()
        self._last_commit = self._clock()
        if durable is None:
            return
        self._failures.pop(task.partition, None)
        self._retake_wait.pop(task.partition, None)

    def _commit_all(self, summary: RunSummary, *, force: bool) -> bool:
        """Commit the tasks that are due (all with ``force``); False if one had to restart."""
        ok = True
        for task in list(self.tasks):
            if task.has_uncommitted() and (force or task.commit_due()):
                try:
                    self._commit(task, summary)
                except UnavailableError as exc:
                    self._restart(task, exc, summary)
                    ok = False
                except FencedError as exc:
                    if self._static:
                        raise
                    self._drop_fenced(task, exc, summary)
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
        self._closing = True
        for task in self.tasks:
            try:
                task.close()
            except Exception:
                log.exception("closing task %s failed", task.task_id)
        if self._joined:
            try:
                self.membership.leave()
            except Exception:
                log.exception("leaving %r failed; its partitions move after its timeout",
                              self.membership)
            self._joined = False
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


_switch_lock = threading.Lock()
_switch_runs = 0
_switch_found = 0.0


@contextmanager
def _switch_interval(seconds: float | None) -> Iterator[None]:
    """``RunConfig.switch_interval_s`` while a run lasts: the first running ``Runtime`` of the
    process keeps the interval it found, each sets its own, and the last to end puts the one
    found back."""
    global _switch_runs, _switch_found
    if seconds is None:
        yield
        return
    with _switch_lock:
        if _switch_runs == 0:
            _switch_found = sys.getswitchinterval()
        _switch_runs += 1
        sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        with _switch_lock:
            _switch_runs -= 1
            if _switch_runs == 0:
                sys.setswitchinterval(_switch_found)


def _few(partitions: list[str]) -> str:
    """A list of partitions for a log line, cut short when long."""
    if len(partitions) <= 12:
        return str(partitions)
    return f"{partitions[:12]} and {len(partitions) - 12} more"


def _default_membership(source: Source) -> Membership:
    """The source's own membership (a consumer group), else every partition."""
    make = getattr(source, "membership", None)
    if callable(make):
        membership: Membership = make()
        return membership
    return StaticMembership()


def run(flow: Flow, store: Store | str | Path, config: RunConfig | None = None,
        **kwargs: Any) -> RunSummary:
    """Run ``flow`` on ``store`` until its inputs end; see ``Runtime``."""
    return Runtime(flow, store, config, **kwargs).run()
