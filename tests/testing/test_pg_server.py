"""The private PostgreSQL server of the test tooling: loopback only, restartable on the same
data and port, removed by close()."""

from __future__ import annotations

import os
from typing import Any

import pytest

if os.environ.get("CI") != "true":  # under CI a missing extra fails the import below
    pytest.importorskip("psycopg", reason="the postgres extra is not installed: "
                        "pip install -e '.[dev,postgres]'")

import psycopg

from resumeflow.testing._pg_server import find_pg_bin


def test_server_listens_on_loopback_and_keeps_data_across_restarts(postgres_server: Any,
                                                                   postgres_dsn: str) -> None:
    """The server listens on 127.0.0.1 only, and a restart keeps its port and its data."""
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (n int)")
        conn.execute("INSERT INTO kept VALUES (42)")
        row = conn.execute("SHOW listen_addresses").fetchone()
        assert row == ("127.0.0.1",)
    port = postgres_server.port
    postgres_server.restart(mode="immediate")
    assert postgres_server.port == port and postgres_server.running
    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute("SELECT n FROM kept").fetchall() == [(42,)]


def test_stopped_server_refuses_connections_until_started(postgres_server: Any,
                                                          postgres_dsn: str) -> None:
    """stop() makes connections fail at once and start() brings the same database back."""
    postgres_server.stop()
    try:
        assert not postgres_server.running
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(postgres_dsn, connect_timeout=2).close()
    finally:
        postgres_server.start()
    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_close_removes_the_cluster(postgres_server: Any) -> None:
    """A second server starts on its own port and directory, and close() removes it."""
    from resumeflow.testing._pg_server import PostgresServer

    with PostgresServer(database="other") as second:
        directory = second.directory
        assert second.port != postgres_server.port
        with psycopg.connect(second.dsn) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("other",)
    assert not directory.exists()
    assert (find_pg_bin() / "initdb").is_file()
