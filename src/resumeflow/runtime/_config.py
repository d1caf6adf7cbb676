"""Run configuration: every bound explicit, checked when the runtime starts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigurationError

__all__ = ["GUARANTEES", "RunConfig"]

GUARANTEES = ("exactly-once", "at-least-once")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """How a flow runs.

    Attributes:
        guarantee: ``exactly-once`` (default) or ``at-least-once`` effects in the sinks.
        replay_max_events: a task commits before more than this many records are read past
            its last checkpoint: the hard bound of records replayed after a crash.
        replay_max_seconds: a task commits once its oldest uncommitted record is this old.
        keep_checkpoints: commit records (and the state versions they need) kept per task for
            fallback and rewind.
        max_attempts: attempts of user code on one record before it is dead-lettered.
        retry_backoff_base_s: first backoff between attempts (full jitter, doubling).
        retry_backoff_max_s: cap of the backoff.
        max_hot_keys: keys kept in memory per stateful operator; clean keys beyond are evicted
            at checkpoints (``math.inf``: never evict).
        follow: keep reading as inputs grow instead of stopping at their end.
        poll_interval_s: sleep between polls when following and nothing is new.
        batch_max_records: records read from a partition at a time (also bounded by the
            replay bound and by the measured cost of a record against ``replay_max_seconds``).
        dead_letter_path: JSON-lines file pattern for dead letters (``{partition}`` is
            replaced); default: next to the store.
        restart_budget: restarts in a row of one task after transient failures (store or
            sink unavailable) before the run fails; a successful commit resets the count.
        restart_backoff_base_s: first wait before such a restart (full jitter, doubling).
        restart_backoff_max_s: cap of that wait.
        seed: seed of the retry jitter (``None``: from the OS).
        pipelined_commit: write each checkpoint (sink pre-commit, the store's commit point,
            finalize) on a background thread of the task while its next batches run; at most
            one commit in flight, counted in the replay bound. ``False``: commit on the
            task's thread, the next batch waits.
        switch_interval_s: the interpreter's thread switch interval while the run lasts
            (``sys.setswitchinterval``; restored when the last running ``Runtime`` ends).
            A commit thread gives the interpreter lock up at each write and sync of a
            checkpoint and waits up to this long for it after each; at Python's 5 ms a
            10 ms commit took 60-90 ms from its cut to durable (W1), at 1 ms about 40.
            ``None``: leave the interpreter's setting alone.
    """

    guarantee: Literal["exactly-once", "at-least-once"] = "exactly-once"
    replay_max_events: int | float = 100_000
    replay_max_seconds: float = 0.1
    keep_checkpoints: int = 10
    max_attempts: int = 3
    retry_backoff_base_s: float = 0.01
    retry_backoff_max_s: float = 1.0
    max_hot_keys: float = 1_000_000
    follow: bool = False
    poll_interval_s: float = 0.05
    batch_max_records: int = 4096
    dead_letter_path: str | None = None
    restart_budget: int = 10
    restart_backoff_base_s: float = 0.1
    restart_backoff_max_s: float = 5.0
    seed: int | None = None
    pipelined_commit: bool = True
    switch_interval_s: float | None = 0.001

    def __post_init__(self) -> None:
        if self.guarantee not in GUARANTEES:
            raise ConfigurationError(
                f"guarantee {self.guarantee!r} is unknown; use one of {', '.join(GUARANTEES)}"
            )
        _positive("replay_max_events", self.replay_max_events, integer=True)
        _positive("replay_max_seconds", self.replay_max_seconds)
        _positive("max_attempts", self.max_attempts, integer=True)
        _positive("batch_max_records", self.batch_max_records, integer=True)
        _positive("max_hot_keys", self.max_hot_keys)
        _positive("poll_interval_s", self.poll_interval_s)
        switch = self.switch_interval_s
        if switch is not None and not (isinstance(switch, (int, float))
                                       and not isinstance(switch, bool) and 0 < switch <= 1):
            raise ConfigurationError(
                f"switch_interval_s={switch!r} must be seconds above 0 and at most 1 (Python's "
                "own is 0.005), or None to leave the interpreter's setting as it is"
            )
        if self.keep_checkpoints < 2:
            raise ConfigurationError(
                f"keep_checkpoints={self.keep_checkpoints}: keep at least 2 so a corrupt newest "
                "checkpoint can fall back to the one before"
            )
        if self.retry_backoff_base_s < 0 or self.retry_backoff_max_s < self.retry_backoff_base_s:
            raise ConfigurationError(
                "retry backoff must satisfy 0 <= retry_backoff_base_s <= retry_backoff_max_s"
            )
        if self.restart_budget < 0 or self.restart_backoff_base_s < 0 or \
                self.restart_backoff_max_s < self.restart_backoff_base_s:
            raise ConfigurationError(
                "restarts must satisfy restart_budget >= 0 and "
                "0 <= restart_backoff_base_s <= restart_backoff_max_s"
            )


def _positive(name: str, value: float, *, integer: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if integer:
        ok = ok and (isinstance(value, int) or value == math.inf)
    if not ok or (isinstance(value, float) and math.isnan(value)):
        kind = "a positive integer" if integer else "a positive number"
        raise ConfigurationError(f"{name}={value!r} must be {kind} (math.inf for no bound)")
