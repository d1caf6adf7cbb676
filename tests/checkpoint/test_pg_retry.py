"""Unit tests of the PostgreSQL retry policy: which failures are transient, capped backoff with
full jitter, the retry budget, and passwords kept out of messages (no server needed)."""

from __future__ import annotations

import os
import random

import pytest

if os.environ.get("CI") != "true":  # under CI a missing extra fails the import below
    pytest.importorskip("psycopg", reason="the postgres extra is not installed: "
                        "pip install -e '.[dev,postgres]'")

import psycopg

from resumeflow.checkpoint._pg_retry import (
    Retrier,
    RetryPolicy,
    describe_dsn,
    is_transient,
)
from resumeflow.errors import ConfigurationError, UnavailableError


def test_transient_failures_are_told_from_permanent_ones() -> None:
    """Lost connections, shutdowns, serialization failures and timeouts are transient; bad
    credentials, missing databases and constraint violations are not."""
    assert is_transient(psycopg.OperationalError("connection failed: Connection refused"))
    assert is_transient(psycopg.errors.AdminShutdown("terminating connection"))
    assert is_transient(psycopg.errors.SerializationFailure("could not serialize"))
    assert is_transient(psycopg.errors.DeadlockDetected("deadlock"))
    assert is_transient(psycopg.errors.IdleInTransactionSessionTimeout("idle"))
    assert is_transient(psycopg.errors.QueryCanceled("statement timeout"))
    assert is_transient(psycopg.errors.CannotConnectNow("starting up"))
    assert not is_transient(psycopg.OperationalError('FATAL: database "x" does not exist'))
    assert not is_transient(psycopg.OperationalError("password authentication failed"))
    assert not is_transient(psycopg.errors.UniqueViolation("duplicate key"))
    assert not is_transient(ValueError("not a database error"))


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _retrier(clock: _Clock, budget_s: float = 10.0) -> Retrier:
    return Retrier(RetryPolicy(budget_s=budget_s, backoff_base_s=0.1, backoff_max_s=0.8),
                   where="db:5432/app", password="hunter2", rng=random.Random(7),
                   sleep=clock.sleep, clock=lambda: clock.now)


def test_retries_back_off_with_capped_full_jitter_and_are_counted() -> None:
    """Each delay is within [0, min(max, base * 2**n)], and every retry is counted."""
    clock = _Clock()
    retrier = _retrier(clock)
    drops = []

    def op(attempt: int) -> str:
        if attempt < 6:
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return "done"

    assert retrier.run("a test", op, lambda: drops.append(1)) == "done"
    assert retrier.retries == 6 and len(drops) == 6
    caps = [min(0.8, 0.1 * 2**n) for n in range(6)]
    assert all(0 <= d <= cap for d, cap in zip(clock.sleeps, caps, strict=True))


def test_a_spent_budget_raises_unavailable_without_the_password() -> None:
    """Past the budget the failure becomes UnavailableError, naming no password."""
    clock = _Clock()
    retrier = _retrier(clock, budget_s=1.0)

    def op(attempt: int) -> None:
        raise psycopg.OperationalError("connection to hunter2@db failed: refused")

    with pytest.raises(UnavailableError) as caught:
        retrier.run("a test", op, lambda: None)
    assert "hunter2" not in str(caught.value) and "retry budget" in str(caught.value)
    assert clock.now <= 1.0


def test_permanent_connection_failures_are_configuration_errors() -> None:
    """A connection refused for a bad database name is not retried: it is configuration."""
    clock = _Clock()
    retrier = _retrier(clock)

    def op(attempt: int) -> None:
        raise psycopg.OperationalError('FATAL:  database "nope" does not exist')

    with pytest.raises(ConfigurationError, match="does not exist"):
        retrier.run("a test", op, lambda: None)
    assert retrier.retries == 0


def test_dsn_description_hides_the_password() -> None:
    """describe_dsn gives host:port/dbname and the password apart; a bad DSN is configuration."""
    assert describe_dsn("postgresql://u:pw@h:6543/app") == ("h:6543/app", "pw")
    assert describe_dsn("host=h dbname=app") == ("h:5432/app", None)
    with pytest.raises(ConfigurationError):
        describe_dsn("host=h = broken")
