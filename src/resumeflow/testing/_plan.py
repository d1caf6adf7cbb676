"""Fault plans: everything a simulated schedule will do wrong, drawn from one seed.

The same seed always draws the same plan, and the simulator draws every later decision from
generators seeded by the plan, so a seed replays a schedule exactly.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

__all__ = ["FaultPlan"]


@dataclass(frozen=True, kw_only=True)
class FaultPlan:
    """What one schedule runs with and what it injects.

    Attributes:
        seed: the seed that drew this plan; replaying it replays the schedule.
        guarantee: the flow's guarantee.
        replay_max_events: bound of the replay window (events).
        replay_max_seconds: bound of the replay window (simulated seconds).
        batch_max_records: most records read at a time.
        keep_checkpoints: commit records kept per task.
        max_attempts: attempts of user code on one record.
        max_hot_keys: hot keys per stateful operator (small values force evictions and cold
            reads from the store).
        faults: how many faults the fault phase injects before the liveness phase.
        max_fault_steps: most scheduling steps of the fault phase.
        crash_rate: chance of a crash at each pass of a crash point of the commit protocol.
        takeover_rate: chance that a drawn crash point instead hands the task to a new owner
            (new epoch) while the old runner goes on as a zombie.
        user_crash_rate: chance of a crash at each call of user code.
        user_error_rate: chance that a call of user code raises (once per record: the retry
            succeeds).
        store_fail_rate: chance that a commit's store write fails.
        store_slow_rate: chance that a commit's store write is slow.
        tear_rate: chance that a commit leaves a torn commit record and crashes.
        precommit_fail_rate: chance that a sink pre-commit fails.
        finalize_fail_rate: chance that a sink finalize fails.
        redeliver_rate: chance that a read redelivers records below the position.
        reorder_rate: chance that a read delivers an earlier batch again, out of order.
        stall_rate: chance that a read finds nothing available.
        restart_delay_rate: chance that a crashed task stays down for another step.
        early_commit_rate: chance of a commit before the bounds require one.
        record_cost_s: simulated seconds one record takes.
    """

    seed: int
    guarantee: Literal["exactly-once", "at-least-once"]
    replay_max_events: int
    replay_max_seconds: float
    batch_max_records: int
    keep_checkpoints: int
    max_attempts: int
    max_hot_keys: float
    faults: int
    max_fault_steps: int
    crash_rate: float
    takeover_rate: float
    user_crash_rate: float
    user_error_rate: float
    store_fail_rate: float
    store_slow_rate: float
    tear_rate: float
    precommit_fail_rate: float
    finalize_fail_rate: float
    redeliver_rate: float
    reorder_rate: float
    stall_rate: float
    restart_delay_rate: float
    early_commit_rate: float
    record_cost_s: float

    @classmethod
    def draw(cls, seed: int, *, guarantee: str | None = None) -> FaultPlan:
        """The plan of ``seed`` (``guarantee``: force one instead of drawing it)."""
        rng = random.Random(seed)

        def rate(high: float) -> float:
            return 0.0 if rng.random() < 0.35 else rng.uniform(0.0, high)

        drawn = "at-least-once" if rng.random() < 0.25 else "exactly-once"
        chosen = guarantee or drawn
        if chosen not in ("exactly-once", "at-least-once"):
            raise ValueError(f"guarantee {chosen!r} is unknown")
        return cls(
            seed=seed,
            guarantee=chosen,  # type: ignore[arg-type]
            replay_max_events=rng.choice([1, 2, 3, 5, 8, 13, 50, 1000]),
            replay_max_seconds=rng.choice([0.001, 0.01, 0.05, 1.0, 60.0]),
            batch_max_records=rng.choice([1, 2, 4, 7, 16, 64]),
            keep_checkpoints=rng.choice([2, 3, 5]),
            max_attempts=rng.choice([1, 2, 3]),
            max_hot_keys=rng.choice([1, 2, 5, float("inf")]),
            faults=rng.randrange(0, 12),
            max_fault_steps=rng.randrange(5, 120),
            crash_rate=rate(0.08),
            takeover_rate=rate(0.5),
            user_crash_rate=rate(0.03),
            user_error_rate=rate(0.1),
            store_fail_rate=rate(0.2),
            store_slow_rate=rate(0.3),
            tear_rate=rate(0.1),
            precommit_fail_rate=rate(0.1),
            finalize_fail_rate=rate(0.15),
            redeliver_rate=rate(0.3),
            reorder_rate=rate(0.2),
            stall_rate=rate(0.2),
            restart_delay_rate=rate(0.6),
            early_commit_rate=rate(0.4),
            record_cost_s=rng.choice([0.0, 1e-4, 1e-3, 0.02]),
        )

    @classmethod
    def quiet(cls, seed: int, *, guarantee: str) -> FaultPlan:
        """A plan that injects nothing: the fault-free reference run."""
        plan = cls.draw(seed, guarantee=guarantee)
        zero: dict[str, Any] = {f.name: 0.0 for f in fields(cls) if f.name.endswith("_rate")}
        return replace(plan, faults=0, max_fault_steps=0, replay_max_events=1000,
                       batch_max_records=64, max_hot_keys=float("inf"), record_cost_s=0.0,
                       **zero)

    def describe(self) -> str:
        """One line per field that is not zero: what this schedule injects."""
        return "\n".join(f"  {k} = {v}" for k, v in asdict(self).items() if v)
