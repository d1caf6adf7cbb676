"""``resumeflow worker``: how a worker of a group is started, and what it refuses."""

from __future__ import annotations

from typing import Any

from resumeflow.cli._worker import is_dsn


def test_worker_of_a_file_source_needs_a_postgres_store_for_leases(work: Any) -> None:
    """A worker whose source has no consumer group and whose store is a SQLite file exits 2
    before processing anything, saying to use a PostgreSQL store or ``run --follow``."""
    events = work.events(10)
    spec = work.pipeline(events)
    done = work.cli("worker", spec, "--store", str(work.store), "--no-progress")
    assert done.returncode == 2, done.stderr
    assert "postgresql://" in done.stderr and "run --follow" in done.stderr
    assert not work.out.exists()


def test_store_argument_is_a_dsn_or_a_path() -> None:
    """``--store`` is a PostgreSQL DSN for URLs and libpq strings, else a SQLite path."""
    assert is_dsn("postgresql://u@h/db") and is_dsn("host=127.0.0.1 port=5 dbname=x")
    assert not is_dsn("state.db") and not is_dsn("/var/lib/flows/orders.db")
