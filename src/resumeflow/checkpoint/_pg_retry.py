"""Retries of transient PostgreSQL failures, and connections that come back after them.

A failure is transient when the server or the network is the cause (connection refused or
reset, server shutting down or restarting, too many connections, a serialization failure or
deadlock, a statement or idle-in-transaction timeout): the operation is retried on a new
connection after a capped exponential backoff with full jitter, until the retry budget (in
seconds of failing) is spent; then ``UnavailableError`` is raised, and the runtime restarts the
task from its checkpoint. Every retry is counted (``Retrier.retries``) and logged. Any other
database error is raised at once: retrying would fail the same way.

Messages never carry the DSN's password (it is cut out of every error text logged or raised).
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict

from ..errors import ConfigurationError, UnavailableError

__all__ = ["PgConnection", "Retrier", "RetryPolicy", "describe_dsn", "is_transient"]

log = logging.getLogger("resumeflow.postgres")

T = TypeVar("T")

_TRANSIENT_CLASSES = ("08", "40", "53", "57")
"""SQLSTATE classes: connection exception, transaction rollback (serialization failure,
deadlock), insufficient resources (too many connections), operator intervention (admin or
crash shutdown, cannot connect now, query canceled by a timeout)."""

_TRANSIENT_STATES = frozenset({"25P03", "55P03"})
"""Idle-in-transaction session timeout; lock not available (lock_timeout)."""

_CONFIG_HINTS = ("does not exist", "password authentication failed", "no pg_hba.conf entry",
                 "authentication failed", "invalid dsn", "invalid connection option",
                 "permission denied")


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How long and how often a PostgreSQL operation is retried.

    Attributes:
        budget_s: seconds an operation may keep failing transiently before
            ``UnavailableError`` (counted from its first failure).
        backoff_base_s: cap of the first delay; the cap doubles at each retry.
        backoff_max_s: largest cap; each delay is uniform in ``[0, cap]`` (full jitter).
    """

    budget_s: float = 30.0
    backoff_base_s: float = 0.05
    backoff_max_s: float = 2.0

    def __post_init__(self) -> None:
        if self.budget_s < 0 or self.backoff_base_s <= 0 or \
                self.backoff_max_s < self.backoff_base_s:
            raise ConfigurationError(
                f"{self!r}: need budget_s >= 0 and 0 < backoff_base_s <= backoff_max_s")


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure of the server or network that a retry may outlive."""
    if not isinstance(exc, psycopg.Error):
        return False
    state = exc.sqlstate
    if state is not None:
        return state[:2] in _TRANSIENT_CLASSES or state in _TRANSIENT_STATES
    if isinstance(exc, psycopg.InterfaceError):
        return "connection" in str(exc).lower()
    if isinstance(exc, psycopg.OperationalError):
        text = str(exc).lower()
        return not any(hint in text for hint in _CONFIG_HINTS)
    return False


def describe_dsn(dsn: str) -> tuple[str, str | None]:
    """``(host:port/dbname, password)`` of a DSN; the first is safe to log."""
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise ConfigurationError(
            f"the PostgreSQL DSN is not valid ({_cut(str(exc), None)}); pass a libpq string "
            "such as 'host=127.0.0.1 port=5432 dbname=app user=app' or a postgresql:// URL"
        ) from None
    where = (f"{parts.get('host') or 'localhost'}:{parts.get('port') or 5432}/"
             f"{parts.get('dbname') or parts.get('user') or ''}")
    password = parts.get("password")
    return where, str(password) if password else None


def _cut(text: str, password: str | None) -> str:
    return text.replace(password, "***") if password else text


class Retrier:
    """Runs operations with retries of transient failures; counts them in ``retries``."""

    def __init__(self, policy: RetryPolicy, *, where: str, password: str | None,
                 rng: random.Random | None = None, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.where = where
        self._password = password
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._clock = clock
        self.retries = 0
        """Transient failures retried since this object was made."""

    def redact(self, text: str) -> str:
        return _cut(text, self._password)

    def run(self, what: str, op: Callable[[int], T], on_failure: Callable[[], None]) -> T:
        """``op(attempt)`` until it succeeds, fails for good, or the budget is spent.

        ``on_failure`` runs after each transient failure (drop the broken connection).
        """
        started: float | None = None
        attempt = 0
        while True:
            try:
                return op(attempt)
            except psycopg.Error as exc:
                on_failure()
                if not is_transient(exc):
                    if isinstance(exc, psycopg.OperationalError):
                        raise self._final(what, exc) from None
                    raise
                now = self._clock()
                started = now if started is None else started
                attempt += 1
                cap = min(self.policy.backoff_max_s,
                          self.policy.backoff_base_s * 2 ** (attempt - 1))
                delay = self._rng.uniform(0, cap)
                reason = self.redact(f"{type(exc).__name__}: {str(exc).strip()}")
                if now - started + delay > self.policy.budget_s:
                    raise UnavailableError(
                        f"PostgreSQL at {self.where}: {what} kept failing for "
                        f"{now - started:.1f} s ({attempt} attempts; last: {reason}); the "
                        "retry budget is spent: the task restarts from its checkpoint. Check "
                        "that the database is up") from None
                self.retries += 1
                log.warning("PostgreSQL at %s: %s failed (%s); retry %d in %.3f s",
                            self.where, what, reason.splitlines()[0], attempt, delay)
                self._sleep(delay)

    def _final(self, what: str, exc: BaseException) -> Exception:
        reason = self.redact(str(exc).strip())
        if isinstance(exc, psycopg.OperationalError) and exc.sqlstate is None:
            return ConfigurationError(
                f"PostgreSQL at {self.where}: {what} failed: {reason}; fix the DSN (host, "
                "port, database, user, password) or the server's access rules")
        return UnavailableError(f"PostgreSQL at {self.where}: {what} failed: {reason}")


class PgConnection:
    """One connection, made on first use and again after it broke.

    Args:
        dsn: libpq connection string or URL.
        options: server settings for the session (``-c name=value`` pairs).
    """

    def __init__(self, dsn: str, *, settings: dict[str, str], application_name: str) -> None:
        self._dsn = dsn
        self._kwargs: dict[str, Any] = {
            "autocommit": True,
            "application_name": application_name,
            "options": " ".join(f"-c {k}={v}" for k, v in settings.items()),
            "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
            "keepalives_count": 3,
        }
        if "connect_timeout" not in dsn:
            self._kwargs["connect_timeout"] = 5
        self._conn: psycopg.Connection[Any] | None = None
        self.connects = 0

    def get(self) -> psycopg.Connection[Any]:
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            self.drop()
            conn = psycopg.connect(self._dsn, **self._kwargs)
            self._conn = conn
            self.connects += 1
        return conn

    def drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            # A broken connection may fail to close; it is gone anyway.
            with contextlib.suppress(Exception):
                conn.close()
