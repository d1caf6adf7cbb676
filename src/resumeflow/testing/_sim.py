"""One simulated schedule: a flow's tasks run on a fake clock through a fault plan.

A schedule builds the flow on a ``MemorySource``, a ``MemorySink`` and a ``MemoryStore``,
drives one ``TaskRunner`` per partition (the same objects the ``Runtime`` drives), and for a
fault phase injects what its ``FaultPlan`` draws: crashes at every crash point of the commit
protocol and inside user code, failed and slow store writes, torn commit records, sink
pre-commit and finalize failures, redelivered and reordered input, and takeovers that leave
the old runner running as a zombie on a stale epoch. A crashed or failed task is restarted from
the store, as a new process would. Then a liveness phase without faults must read every input
to its end. Every decision comes from generators seeded by the plan, so a seed replays the
schedule exactly. ``SQLiteSchedule`` (``_sqlite_sim``) overrides the backend hooks to run the
same plans on ``SQLiteStore`` and real sinks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
from collections.abc import Callable
from typing import Any, Protocol

from .._faults import installed
from ..checkpoint import Store
from ..errors import FencedError, UnavailableError
from ..flow import Flow
from ..runtime import RunConfig, TaskRunner
from ..runtime._task import DeferredCommitExecutor
from ..sinks import SinkContext, SinkWriter
from ._check import Outcome, outcome
from ._clock import FakeClock
from ._crash import SimulatedCrash
from ._observe import ObservedStore, Violation
from ._plan import FaultPlan
from ._sink import MemorySink
from ._source import MemorySource
from ._store import MemoryStore

__all__ = ["BuildFlow", "FaultySink", "FaultyStore", "InjectedUserError", "Schedule"]

BuildFlow = Callable[[MemorySource, Any], Flow]
"""Builds the flow under test on the simulator's source and sink (a ``MemorySink`` on the
memory backend, a real sink on the SQLite backend)."""


class FaultyStore(Protocol):
    """A store whose next commits can be made to fail, to be slow or to tear."""

    fail_writes: int
    slow_write_s: float
    tear_next: bool


class FaultySink(Protocol):
    """A sink whose next pre-commits and finalizes can be made to fail."""

    name: str
    fail_precommits: int
    fail_finalizes: int

    def open(self, ctx: SinkContext) -> SinkWriter: ...

PIPELINED_COMMIT_RATE = 0.5
"""Share of commits a schedule makes pipelined (``commit_async``): the cut now, the writes
later, while the runner reads on."""
PIPELINED_RUN_RATE = 0.15
"""Chance, at each step of a runner, that its pipelined commit in flight runs before it."""

_TAKEOVER_POINTS = frozenset({
    "batch.mid", "commit.before_precommit", "commit.after_precommit", "commit.after_store",
    "sink.finalize.partial", "commit.after_finalize",
})
"""Points where a new owner may take the task while the old runner carries on. Not
``store.before_commit``: inside the store's transaction a new owner waits for the lock."""


class InjectedUserError(Exception):
    """A transient failure the simulator injects into user code (the retry succeeds)."""


class Schedule:
    """Runs one fault plan against a flow; ``run()`` returns the violations it observed.

    Args:
        build_flow: builds the flow on the given source and sink.
        inputs: records per partition.
        plan: what to inject.
        trace: called with one line per event (for ``replay``).
        store_type: the store class (a ``MemoryStore`` subclass, e.g. a deliberately broken
            one to test the checker).
        sink_type: the sink class for output and dead letters (a ``MemorySink`` subclass).
    """

    takeover_points = _TAKEOVER_POINTS
    """Crash points where a takeover may be drawn instead of a crash."""

    def __init__(self, build_flow: BuildFlow, inputs: dict[str, list[Any]], plan: FaultPlan,
                 *, trace: Callable[[str], None] | None = None,
                 store_type: type[MemoryStore] = MemoryStore,
                 sink_type: type[MemorySink] = MemorySink) -> None:
        self.plan = plan
        self.inputs = inputs
        self._trace = trace
        self._events = hashlib.sha256()
        self._redact: str | None = None
        self.rng = random.Random(plan.seed * 7919 + 1)
        self.clock = FakeClock()
        envelopes = {p: [(p, i, v) for i, v in enumerate(values)] for p, values in inputs.items()}
        self.source = MemorySource(
            envelopes, redeliver_rate=plan.redeliver_rate, reorder_rate=plan.reorder_rate,
            stall_rate=plan.stall_rate, rng=random.Random(plan.seed * 7919 + 2),
            decode=self._decode)
        self.sink: FaultySink
        self.dead: FaultySink
        self.sink, self.dead = self._make_sinks(sink_type)
        self.store: Store = self._make_store(store_type)
        self.flow = build_flow(self.source, self.sink)
        self._wrap_user_code(self.flow)
        self.config = RunConfig(
            guarantee=plan.guarantee, replay_max_events=plan.replay_max_events,
            replay_max_seconds=plan.replay_max_seconds, keep_checkpoints=plan.keep_checkpoints,
            max_attempts=plan.max_attempts, batch_max_records=plan.batch_max_records,
            max_hot_keys=plan.max_hot_keys, retry_backoff_base_s=0.001,
            retry_backoff_max_s=0.01, seed=plan.seed)
        self.partitions = self.source.partitions()
        self.task_of = {p: f"{self.flow.name}:{self.source.name}:{p}" for p in self.partitions}
        self.observed = ObservedStore(
            self.store, partition_of={t: p for p, t in self.task_of.items()},
            high_water=self.source.high_water.__getitem__,
            replay_max_events=plan.replay_max_events)
        self.owners: dict[str, TaskRunner | None] = dict.fromkeys(self.partitions)
        self.zombies: list[TaskRunner] = []
        self.faults_left = plan.faults
        self.faulting = plan.faults > 0
        self.violations: list[Violation] = []
        self.counts: dict[str, int] = {"crashes": 0, "restarts": 0, "commits": 0,
                                       "takeovers": 0, "faults": 0, "fenced": 0}
        self._current: TaskRunner | None = None
        self._in_open = False
        self._record: tuple[str, int] | None = None
        self._injected: set[tuple[str, int]] = set()
        self._executors: dict[TaskRunner, DeferredCommitExecutor] = {}

    # -- backends (the SQLite schedule overrides these) ----------------------------------------

    def _make_sinks(self, sink_type: type[MemorySink]) -> tuple[FaultySink, FaultySink]:
        """The output and dead-letter sinks."""
        return sink_type("out"), sink_type("dead-letters")

    def _make_store(self, store_type: type[MemoryStore]) -> Store:
        """The store the observer watches (here the one store every runner shares)."""
        self._memory = store_type(keep_checkpoints=self.plan.keep_checkpoints, clock=self.clock)
        return self._memory

    def _new_runner(self, partition: str) -> TaskRunner:
        """A runner for ``partition``, as a new process would make it."""
        return TaskRunner(
            flow=self.flow, partition=partition, partitions=len(self.partitions),
            store=self.observed, config=self.config, dead_letters=self.dead,
            clock=self.clock.monotonic, wall=self.clock.time, sleep=self.clock.sleep,
            rng=random.Random(self.plan.seed), store_path=None,
            executor=DeferredCommitExecutor())

    def _fault_stores(self, runner: TaskRunner | None) -> list[FaultyStore]:
        """The stores a fault drawn for ``runner``'s commit applies to (``None``: all)."""
        return [self._memory]

    def _retire(self, runner: TaskRunner, *, crashed: bool) -> None:
        """``runner`` is gone (crashed, fenced or done): release what its process held."""

    def outcome(self) -> tuple[Outcome, list[Violation]]:
        """What the run left durable, and any violation found reading it."""
        sink, dead = self.sink, self.dead
        if not (isinstance(sink, MemorySink) and isinstance(dead, MemorySink)):
            raise TypeError(f"the memory schedule reads MemorySinks, not {sink!r}, {dead!r}")
        return outcome(tasks=self.task_of, guarantee=self.plan.guarantee, sink=sink,
                       dead=dead, store=self._memory, observed=self.observed), []

    def expected(self, reference: Outcome) -> Outcome:
        """What this schedule's backends must hold, given the memory reference run."""
        return reference

    def cleanup(self) -> None:
        """Release what the schedule holds once its outcome is read (files, for real
        backends)."""

    # -- events ----------------------------------------------------------------------------

    def _event(self, text: str) -> None:
        if self._redact:
            text = text.replace(self._redact, "$DIR")
        self._events.update(text.encode())
        if self._trace is not None:
            self._trace(f"[t={self.clock.monotonic():.4f}] {text}")

    @property
    def fingerprint(self) -> str:
        """Digest of every event so far: equal for two runs of one seed."""
        return self._events.hexdigest()

    def _spend(self, what: str) -> None:
        self.faults_left -= 1
        self.counts["faults"] += 1
        self._event(f"fault: {what}")

    # -- injection sites -------------------------------------------------------------------

    def _decode(self, raw: Any) -> Any:
        self._record = (raw[0], raw[1])
        return raw[2]

    def _wrap_user_code(self, flow: Flow) -> None:
        for i, op in enumerate(flow.operators):
            flow.operators[i] = dataclasses.replace(op, fn=self._wrapped(op.fn))

    def _wrapped(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def user_code(*args: Any) -> Any:
            if self.faulting and self.faults_left > 0:
                self._user_fault()
            return fn(*args)
        return user_code

    def _user_fault(self) -> None:
        plan, draw = self.plan, self.rng.random()
        if draw < plan.user_crash_rate:
            self._spend(f"crash in user code at record {self._record}")
            raise SimulatedCrash("user code")
        if (draw < plan.user_crash_rate + plan.user_error_rate and plan.max_attempts > 1
                and self._record is not None and self._record not in self._injected):
            self._injected.add(self._record)
            self._spend(f"transient error in user code at record {self._record}")
            raise InjectedUserError(f"injected transient failure at record {self._record}")

    def _crash_point(self, point: str) -> None:
        if not self.faulting or self.faults_left <= 0:
            return
        if self.rng.random() >= self.plan.crash_rate:
            return
        runner = self._current
        if (runner is not None and not self._in_open and point in self.takeover_points
                and self.owners.get(runner.partition) is runner
                and self.rng.random() < self.plan.takeover_rate):
            self._spend(f"takeover of {runner.task_id} at {point}")
            self._takeover(runner)
            return
        self._spend(f"crash at {point}")
        raise SimulatedCrash(point)

    def _arm_commit(self, runner: TaskRunner) -> None:
        if not self.faulting or self.faults_left <= 0:
            return
        plan, rng = self.plan, self.rng
        if rng.random() < plan.store_slow_rate:
            slow_s = rng.choice([0.01, 0.2, 2.0])
            for store in self._fault_stores(runner):
                store.slow_write_s = slow_s
        draw = rng.random()
        for rate, arm in ((plan.store_fail_rate, "store write fails"),
                          (plan.tear_rate, "torn commit record"),
                          (plan.precommit_fail_rate, "sink pre-commit fails"),
                          (plan.finalize_fail_rate, "sink finalize fails")):
            if draw < rate:
                self._spend(arm)
                self._set_fault(arm, runner)
                return
            draw -= rate

    def _set_fault(self, arm: str, runner: TaskRunner) -> None:
        if arm == "store write fails":
            for store in self._fault_stores(runner):
                store.fail_writes = 1
        elif arm == "torn commit record":
            for store in self._fault_stores(runner):
                store.tear_next = True
        else:
            sink = self.sink if self.rng.random() < 0.8 else self.dead
            if arm == "sink pre-commit fails":
                sink.fail_precommits = 1
            else:
                sink.fail_finalizes = 1

    def _disarm(self) -> None:
        for store in self._fault_stores(None):
            store.fail_writes = 0
            store.slow_write_s = 0.0
            store.tear_next = False
        for sink in (self.sink, self.dead):
            sink.fail_precommits = sink.fail_finalizes = 0

    # -- tasks -----------------------------------------------------------------------------

    def _open(self, partition: str) -> TaskRunner | None:
        runner = self._new_runner(partition)
        if isinstance(runner.executor, DeferredCommitExecutor):
            # Pipelined commits run at seeded later steps of the runner (``_drive``).
            self._executors[runner] = runner.executor
        previous, was_in_open = self._current, self._in_open
        self._current, self._in_open = runner, True
        if self.faulting and self.faults_left > 0 and \
                self.rng.random() < self.plan.finalize_fail_rate:
            self._spend("sink finalize fails during recovery")
            self.sink.fail_finalizes = 1
        try:
            recovery = runner.open()
        except (SimulatedCrash, UnavailableError) as exc:
            self._event(f"open of {runner.task_id} failed: {type(exc).__name__}: {exc}")
            self.owners[partition] = None
            self._retire(runner, crashed=True)
            return None
        except Exception as exc:
            self._error(runner, "open", exc)
            self.owners[partition] = None
            self._retire(runner, crashed=True)
            return None
        finally:
            self._current, self._in_open = previous, was_in_open
            self._disarm()
        self.owners[partition] = runner
        self._event(f"open {runner.task_id} epoch {recovery.epoch} seq {recovery.seq} "
                    f"positions {recovery.positions} discarded {list(recovery.discarded_seqs)}")
        return runner

    def _takeover(self, runner: TaskRunner) -> None:
        self.counts["takeovers"] += 1
        self.zombies.append(runner)
        self.owners[runner.partition] = None
        self._open(runner.partition)

    def _lose(self, runner: TaskRunner, why: str) -> None:
        self._event(f"lost {runner.task_id} epoch {runner.opened.epoch}: {why}")
        if self.owners.get(runner.partition) is runner:
            self.owners[runner.partition] = None
            self.counts["restarts"] += 1
        elif runner in self.zombies:
            self.zombies.remove(runner)
        self._retire(runner, crashed=True)

    def _error(self, runner: TaskRunner, what: str, exc: BaseException) -> None:
        self.violations.append(Violation(
            kind="error", task=runner.task_id,
            detail=f"{what} raised {type(exc).__name__}: {exc}"))
        self._event(f"error in {runner.task_id} during {what}: {type(exc).__name__}: {exc}")

    def _drive(self, runner: TaskRunner) -> None:
        """One step of ``runner``, and a commit when it is due: synchronous, or pipelined
        (its writes run at a seeded later step, or when the runner waits for it)."""
        self._current = runner
        executor = self._executors.get(runner)
        if executor is not None and self.rng.random() < PIPELINED_RUN_RATE:
            self._arm_commit(runner)
            try:
                if executor.run_pending():  # a failure is raised by the runner's next wait
                    self._event(f"pipelined commit of {runner.task_id} ran")
            finally:
                self._disarm()
        seq = runner.seq
        n = runner.step()
        if runner.seq != seq:  # the step waited for the pipelined commit in flight
            self.counts["commits"] += 1
            self._event(f"commit {runner.task_id} seq {runner.seq} durable")
        self.clock.advance(n * self.plan.record_cost_s + 1e-4)
        if not runner.has_uncommitted():
            return
        if not (runner.commit_due() or runner.at_end
                or self.rng.random() < self.plan.early_commit_rate * self.faulting):
            return
        pipelined = executor is not None and self.rng.random() < PIPELINED_COMMIT_RATE
        self._arm_commit(runner)
        try:
            record = runner.commit_async() if pipelined else runner.commit()
        finally:
            self._disarm()
        if pipelined:
            self._event(f"cut {runner.task_id} at positions {runner.positions}")
        if record is None:
            return
        self.counts["commits"] += 1
        self._event(f"commit {runner.task_id} epoch {record.epoch} seq {record.seq} "
                    f"positions {record.positions}")

    def _act(self, runner: TaskRunner) -> None:
        try:
            self._drive(runner)
        except SimulatedCrash as exc:
            self.counts["crashes"] += 1
            self._lose(runner, f"crashed ({exc})")
        except FencedError:
            self.counts["fenced"] += 1
            if runner in self.zombies:
                self._lose(runner, "fenced (zombie)")
            else:
                self._error(runner, "commit", FencedError("an owner was fenced"))
                self._lose(runner, "fenced owner")
        except UnavailableError as exc:
            self._lose(runner, f"unavailable ({exc})")
        except Exception as exc:
            self._error(runner, "step or commit", exc)
            self._lose(runner, "error")
        finally:
            self._current = None

    # -- phases ----------------------------------------------------------------------------

    def run(self) -> list[Violation]:
        """Fault phase, then liveness phase; returns every violation observed."""
        logger = logging.getLogger("resumeflow")
        level = logger.level
        logger.setLevel(logging.CRITICAL + 1)  # dead letters and fallbacks are expected here
        try:
            with installed(self._crash_point):
                self._fault_phase()
                self._liveness_phase()
        finally:
            logger.setLevel(level)
            for runner in [*self.zombies, *(r for r in self.owners.values() if r is not None)]:
                self._retire(runner, crashed=False)
        self.violations[:0] = self.observed.violations
        return self.violations

    def _fault_phase(self) -> None:
        plan, rng = self.plan, self.rng
        for _ in range(plan.max_fault_steps):
            if not self.faulting or self.faults_left <= 0 or self.violations:
                break
            for partition, owner in self.owners.items():
                if owner is None and rng.random() >= plan.restart_delay_rate:
                    self._open(partition)
            live = [r for r in self.owners.values() if r is not None] + self.zombies
            if not live:
                continue
            self._act(live[rng.randrange(len(live))])

    def _liveness_phase(self) -> None:
        self.faulting = False
        self._disarm()
        self.source.quiet()
        for zombie in self.zombies:
            self._retire(zombie, crashed=False)
        self.zombies.clear()
        self._event("liveness phase")
        total = sum(len(v) for v in self.inputs.values())
        for partition, owner in self.owners.items():
            if owner is None and self._open(partition) is None:
                self.violations.append(Violation(kind="stalled", task=self.task_of[partition],
                                                 detail="the task cannot be reopened"))
                return
        runners = [r for r in self.owners.values() if r is not None]
        for _ in range(4 * total + 100):
            busy = [r for r in runners if not r.at_end or r.has_uncommitted()]
            if not busy:
                break
            for runner in busy:
                try:
                    self._drive(runner)
                except Exception as exc:
                    self._error(runner, "liveness step", exc)
                    return
        else:
            self.violations.append(Violation(
                kind="stalled", task="",
                detail=f"inputs not read to their end after {4 * total + 100} rounds"))
        for runner in runners:
            runner.close()
