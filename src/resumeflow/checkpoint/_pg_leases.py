"""Leases in PostgreSQL: workers share the partitions of a source without a group protocol.

Each partition of a lease group has one row: owner, expiry and last heartbeat, all in the
server's clock (workers' clocks never decide). Each worker has a row too, renewed by every
``poll``: the live workers (unexpired rows) set the fair share ``ceil(partitions / live)``. A
worker takes free or expired leases up to its share, renews the ones it holds, gives back
what exceeds its share (reported as lost at once, released in the database at the next poll,
so the runtime can commit and close those tasks first), and reports a lease as lost when its
renewal fails or it expired.

A lease is advice about who should run a task; it is not the fence. The store's epoch is:
the worker that takes a lease opens the task, which bumps the epoch, so a worker whose lease
expired and was taken (paused, partitioned) is refused at its next commit with
``FencedError``, whatever its own view of the lease.

When the database is unreachable, ``poll`` keeps the leases it renewed less than ``lease_s``
ago (by the local monotonic clock, from the start of the last successful renewal) and reports
the others lost; it never raises for a transient failure.
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg

from ..errors import ConfigurationError, UnavailableError
from ._pg_retry import PgConnection, Retrier, RetryPolicy, describe_dsn

__all__ = ["PostgresLeases"]

log = logging.getLogger("resumeflow.leases")

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

_DDL = """
CREATE TABLE IF NOT EXISTS {s}.leases (
    grp text NOT NULL, partition text NOT NULL, owner text,
    expires_at timestamptz NOT NULL DEFAULT '-infinity',
    heartbeat_at timestamptz, PRIMARY KEY (grp, partition));
CREATE TABLE IF NOT EXISTS {s}.lease_workers (
    grp text NOT NULL, worker text NOT NULL, expires_at timestamptz NOT NULL,
    PRIMARY KEY (grp, worker))
"""


class PostgresLeases:
    """One worker's side of a lease group (the ``Membership`` protocol of the runtime).

    Args:
        dsn: the database (usually the one of the pipeline's ``PostgresStore``).
        worker_id: unique and stable per worker process (e.g. host and pid).
        lease_s: how long a lease and a worker's liveness last without a poll; poll well
            within it (a third of it, or more often).
        group: the lease group (one per source of a flow, e.g. the flow and source names).
        schema: the schema of the lease tables (created when missing).
        retry: retry budget per poll (default: a quarter of ``lease_s``).
        clock: local monotonic clock (tests).
    """

    def __init__(self, dsn: str, *, worker_id: str, lease_s: float, group: str = "default",
                 schema: str = "resumeflow", retry: RetryPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        if not lease_s > 0 or math.isinf(lease_s):
            raise ConfigurationError(f"lease_s={lease_s}: give a finite number of seconds > 0")
        if not worker_id:
            raise ConfigurationError("worker_id is empty; give each worker a unique id")
        if not _SCHEMA_NAME.match(schema):
            raise ConfigurationError(f"schema {schema!r} is not a plain lower-case identifier")
        self.where, password = describe_dsn(dsn)
        self.worker_id = worker_id
        self.lease_s = lease_s
        self.group = group
        self._s = schema
        self._clock = clock
        policy = retry or RetryPolicy(budget_s=lease_s / 4,
                                      backoff_base_s=min(0.05, lease_s / 40),
                                      backoff_max_s=max(min(0.05, lease_s / 40), lease_s / 10))
        self._retrier = Retrier(policy, where=self.where, password=password, rng=rng)
        self._conn = PgConnection(dsn, settings={"statement_timeout": str(int(lease_s * 1000)),
                                                 "lock_timeout": str(int(lease_s * 500))},
                                  application_name=f"resumeflow-leases:{worker_id}"[:63])
        self._partitions: list[str] = []
        self.held: set[str] = set()
        """Partitions this worker holds, as of the last poll."""
        self._giving_back: set[str] = set()
        self._renewed_at: float | None = None
        self.polls = 0

    @property
    def retries(self) -> int:
        return self._retrier.retries

    def _run(self, what: str, op: Callable[[psycopg.Connection[Any]], Any]) -> Any:
        return self._retrier.run(what, lambda _: op(self._conn.get()), self._conn.drop)

    # -- the Membership protocol -------------------------------------------------------------

    def join(self, partitions: Sequence[str]) -> None:
        """Register every partition of the source and this worker; takes nothing yet (the
        first ``poll`` does)."""
        self._partitions = sorted(set(partitions))
        s = self._s

        def tx(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"resumeflow:{s}",))
                conn.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
                for statement in _DDL.format(s=s).split(";"):
                    conn.execute(statement)
                with conn.cursor() as cur:
                    cur.executemany(f"INSERT INTO {s}.leases (grp, partition) VALUES (%s, %s) "
                                    "ON CONFLICT DO NOTHING",
                                    [(self.group, p) for p in self._partitions])
                conn.execute(self._sql_register, self._register_args())

        self._run("joining the lease group", tx)

    @property
    def _sql_register(self) -> str:
        return (f"INSERT INTO {self._s}.lease_workers VALUES (%s, %s, clock_timestamp() + "
                "make_interval(secs => %s)) ON CONFLICT (grp, worker) DO UPDATE SET "
                "expires_at = excluded.expires_at")

    def _register_args(self) -> tuple[Any, ...]:
        return (self.group, self.worker_id, self.lease_s)

    def poll(self) -> tuple[list[str], list[str]]:
        """Renew, give back and take leases; ``(gained, lost)`` since the last poll."""
        self.polls += 1
        started = self._clock()
        try:
            still, taken, surplus = self._run("renewing leases", self._poll_tx)
        except UnavailableError as exc:
            return self._unreachable(started, exc)
        self._renewed_at = started
        lost = sorted(self.held - still)
        for partition in lost:
            log.warning("worker %s lost the lease of partition %r (expired or taken)",
                        self.worker_id, partition)
        held = (still | taken) - surplus
        given = sorted(surplus & (still | taken))
        for partition in given:
            log.info("worker %s gives back partition %r (over its fair share)", self.worker_id,
                     partition)
        self._giving_back = set(given)
        gained = sorted(taken - self.held - surplus)
        self.held = held
        return gained, sorted(set(lost) | set(given))

    def _unreachable(self, started: float, exc: UnavailableError) -> tuple[list[str],
                                                                         list[str]]:
        renewed = self._renewed_at
        if renewed is not None and started - renewed < self.lease_s:
            log.warning("worker %s: %s; keeping its leases until they would expire",
                        self.worker_id, exc)
            return [], []
        lost, self.held = sorted(self.held), set()
        if lost:
            log.warning("worker %s: leases not renewed for %.1f s (%s); reporting %s lost",
                        self.worker_id, self.lease_s, exc, lost)
        return [], lost

    def _poll_tx(self, conn: psycopg.Connection[Any]) -> tuple[set[str], set[str], set[str]]:
        s, g, me = self._s, self.group, self.worker_id
        with conn.transaction():
            conn.execute(self._sql_register, self._register_args())
            if self._giving_back:
                conn.execute(f"UPDATE {s}.leases SET owner = NULL, expires_at = '-infinity' "
                             "WHERE grp = %s AND owner = %s AND partition = ANY(%s)",
                             (g, me, sorted(self._giving_back)))
            still = {r[0] for r in conn.execute(
                f"UPDATE {s}.leases SET expires_at = clock_timestamp() + make_interval(secs => "
                "%s), heartbeat_at = clock_timestamp() WHERE grp = %s AND owner = %s AND "
                "expires_at > clock_timestamp() AND partition = ANY(%s) RETURNING partition",
                (self.lease_s, g, me, sorted(self.held - self._giving_back)))}
            row = conn.execute(
                f"SELECT count(*), (SELECT count(*) FROM {s}.leases WHERE grp = %s) FROM "
                f"{s}.lease_workers WHERE grp = %s AND expires_at > clock_timestamp()",
                (g, g)).fetchone()
            live, total = (max(1, int(row[0])), int(row[1])) if row else (1, 0)
            share = math.ceil(total / live)
            taken: set[str] = set()
            lost_now = self.held - still
            if len(still) < share:
                taken = {r[0] for r in conn.execute(
                    f"UPDATE {s}.leases SET owner = %s, expires_at = clock_timestamp() + "
                    "make_interval(secs => %s), heartbeat_at = clock_timestamp() WHERE "
                    f"(grp, partition) IN (SELECT grp, partition FROM {s}.leases WHERE grp = %s "
                    "AND (owner IS NULL OR expires_at <= clock_timestamp()) AND NOT "
                    "partition = ANY(%s) ORDER BY partition LIMIT %s FOR UPDATE SKIP LOCKED) "
                    "RETURNING partition",
                    (me, self.lease_s, g, sorted(lost_now), share - len(still)))}
            surplus = set(sorted(still)[share:]) if len(still) > share else set()
            conn.execute(f"DELETE FROM {s}.lease_workers WHERE grp = %s AND expires_at < "
                         "clock_timestamp() - make_interval(secs => %s)", (g, 10 * self.lease_s))
        return still, taken, surplus

    def leave(self) -> None:
        """Release every lease this worker holds and unregister it; a crash instead leaves
        them to expire after ``lease_s``."""
        s, g, me = self._s, self.group, self.worker_id

        def tx(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction():
                conn.execute(f"UPDATE {s}.leases SET owner = NULL, expires_at = '-infinity' "
                             "WHERE grp = %s AND owner = %s", (g, me))
                conn.execute(f"DELETE FROM {s}.lease_workers WHERE grp = %s AND worker = %s",
                             (g, me))

        try:
            self._run("releasing leases", tx)
        except UnavailableError as exc:
            log.warning("worker %s could not release its leases (%s); they expire in %.1f s",
                        self.worker_id, exc, self.lease_s)
        finally:
            self.held = set()
            self._giving_back = set()
            self._conn.drop()

    def close(self) -> None:
        """Drop the connection (without releasing: call ``leave`` for that)."""
        self._conn.drop()
