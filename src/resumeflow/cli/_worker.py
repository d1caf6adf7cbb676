"""``resumeflow worker``: one worker of a group, running the tasks its membership gives it.

Start the same command on as many machines or processes as wanted; each runs until SIGTERM or
SIGINT (it then commits its tasks and leaves the group, so the others take its partitions at
once). A worker that dies instead loses its partitions when its membership times out; the next
owner resumes each task from its last commit record and fences the dead one.

Which partitions a worker runs: a source with a group protocol brings its own membership (a
``KafkaSource``: its consumer group); any other source is shared through PostgreSQL leases
(``PostgresLeases``) in the database of a ``postgresql://`` store.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import click
from rich.markup import escape

from ..checkpoint import SQLiteStore, Store
from ..errors import ConfigurationError
from ..flow import Flow
from ..runtime import Membership, RunConfig, Runtime, ThrottledMembership
from ._main import _progress_line, _setup_logging, err, load_flow, main

__all__ = ["open_store", "worker"]

_DSN_PREFIXES = ("postgresql://", "postgres://")


def is_dsn(store: str) -> bool:
    """Whether ``--store`` names a PostgreSQL database rather than a SQLite file."""
    return store.startswith(_DSN_PREFIXES) or "dbname=" in store or "host=" in store


def open_store(store: str, *, keep_checkpoints: int) -> Store:
    """A ``PostgresStore`` for a DSN, else a ``SQLiteStore`` at the path."""
    if is_dsn(store):
        try:
            from ..checkpoint import PostgresStore
        except ImportError:
            raise ConfigurationError("a postgresql:// store needs psycopg: pip install "
                                     "'resumeflow[postgres]'") from None
        return PostgresStore(store, keep_checkpoints=keep_checkpoints)
    return SQLiteStore(store, keep_checkpoints=keep_checkpoints)


def _membership(flow: Flow, store: str, worker_id: str, lease_s: float) -> Membership | None:
    """``None`` when the source brings its own; else leases in the store's database."""
    source = flow.source_
    if callable(getattr(source, "membership", None)):
        return None
    if not is_dsn(store):
        raise ConfigurationError(
            f"the source {source.name!r} has no consumer group, so workers share its partitions "
            "through leases in PostgreSQL: pass --store postgresql://..., or run it in one "
            "process with `resumeflow run --follow`")
    from ..checkpoint._pg_leases import PostgresLeases

    leases = PostgresLeases(store, worker_id=worker_id, lease_s=lease_s,
                            group=f"{flow.name}:{source.name}")
    # A lease poll is a database transaction: a few per lease period are enough.
    return ThrottledMembership(leases, interval_s=lease_s / 5)


@main.command()
@click.argument("flow_spec", metavar="FILE.py:ATTR")
@click.option("--store", required=True,
              help="Store shared by every worker: a postgresql:// DSN (several machines) or a "
                   "SQLite file (workers on one machine).")
@click.option("--guarantee", type=click.Choice(["exactly-once", "at-least-once"]),
              default="exactly-once", show_default=True)
@click.option("--replay-max-events", type=int, default=100_000, show_default=True,
              help="Commit before more records than this are uncommitted.")
@click.option("--replay-max-seconds", type=float, default=0.1, show_default=True,
              help="Commit once the oldest uncommitted record is this old.")
@click.option("--keep-checkpoints", type=int, default=10, show_default=True)
@click.option("--max-attempts", type=int, default=3, show_default=True,
              help="Attempts of user code on a record before it is dead-lettered.")
@click.option("--dead-letters", default=None,
              help="JSON-lines path of dead letters, with {partition} (default: next to a "
                   "SQLite store; required with PostgreSQL).")
@click.option("--worker-id", default=None,
              help="Unique id of this worker in a lease group (default: host and pid).")
@click.option("--lease-seconds", type=float, default=10.0, show_default=True,
              help="Lease length when partitions are shared through PostgreSQL leases.")
@click.option("--progress/--no-progress", default=None,
              help="Live progress line (default: when stderr is a terminal).")
@click.option("-v", "--verbose", is_flag=True)
def worker(flow_spec: str, store: str, guarantee: str, replay_max_events: int,
           replay_max_seconds: float, keep_checkpoints: int, max_attempts: int,
           dead_letters: str | None, worker_id: str | None, lease_seconds: float,
           progress: bool | None, verbose: bool) -> None:
    """Run FILE.py:ATTR as one worker of a group until SIGTERM or SIGINT."""
    started = time.monotonic()
    _setup_logging(verbose)
    flow = load_flow(flow_spec)
    config = RunConfig(guarantee=guarantee,  # type: ignore[arg-type]
                       replay_max_events=replay_max_events,
                       replay_max_seconds=replay_max_seconds, keep_checkpoints=keep_checkpoints,
                       max_attempts=max_attempts, follow=True, dead_letter_path=dead_letters)
    worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
    membership = _membership(flow, store, worker_id, lease_seconds)
    the_store = open_store(store, keep_checkpoints=keep_checkpoints)
    show = err.is_terminal if progress is None else progress
    try:
        runtime = Runtime(flow, the_store, config, membership=membership,
                          progress=_progress_line if show else None)
        err.print(escape(f"resumeflow: worker {worker_id} of {flow.name!r} on "
                         f"{_where(the_store)}; SIGTERM commits and leaves"))
        summary = runtime.run()
    finally:
        the_store.close()
    if show:
        err.print(" " * 80, end="\r")
    err.print(escape(
        f"resumeflow: worker {worker_id}: {summary.records_in} records in "
        f"{summary.elapsed_s:.2f} s, {summary.commits} commits, {summary.rebalances} "
        f"rebalances, tasks gained {summary.tasks_gained} released {summary.tasks_released} "
        f"fenced {summary.fenced}, replayed {summary.records_replayed}, dead letters "
        f"{summary.dead_letters}, restarts {summary.restarts}, "
        f"{_retries(flow, the_store)}, process time "
        f"{time.monotonic() - started:.2f} s"
        + (f"; stopped by {summary.stopped_by} after committing" if summary.stopped_by else "")))


def _retries(flow: Flow, store: Any) -> str:
    """Transient failures retried by the source, the sink and the store (those that count)."""
    counts = [getattr(flow.source_, "retries", None), getattr(flow.sink_, "retries", None),
              getattr(store, "retries", None)]
    source, sink, stored = ("-" if n is None else str(n) for n in counts)
    return f"retries: source {source}, sink {sink}, store {stored}"


def _where(store: Any) -> str:
    return str(getattr(store, "name", None) or getattr(store, "path", "the store"))
