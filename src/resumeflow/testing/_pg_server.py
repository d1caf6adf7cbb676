"""A private PostgreSQL server for tests: Debian's binaries, a fresh cluster in a temp dir.

``PostgresServer`` runs ``initdb`` in a new temporary directory (as the ``postgres`` user
through ``runuser`` when the process runs as root, since PostgreSQL refuses to run as root),
starts ``postgres`` listening on 127.0.0.1 and a free port (its unix socket stays in the
temporary directory), waits until it accepts connections and creates a database. Local
connections are trusted (``trust`` auth over 127.0.0.1 only), so no password exists to leak.

``stop()`` / ``start()`` / ``restart()`` keep the data directory and the port, so tests can take
the database away mid-run; ``close()`` stops the server and removes the directory. A crash of
the test process leaves the directory and possibly a running server behind; both live only
under the system's temporary directory.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

__all__ = ["PostgresServer", "PostgresUnavailable", "find_pg_bin"]

log = logging.getLogger("resumeflow.testing.postgres")


class PostgresUnavailable(RuntimeError):
    """The server could not be started here (no binaries, no user to run them as, ...)."""


def find_pg_bin() -> Path:
    """The newest ``/usr/lib/postgresql/*/bin`` with ``initdb`` and ``postgres`` (or
    ``$RESUMEFLOW_PG_BIN``)."""
    override = os.environ.get("RESUMEFLOW_PG_BIN")
    candidates = [override] if override else sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: _version_key(Path(p).parent.name), reverse=True)
    for candidate in candidates:
        path = Path(candidate)
        if (path / "initdb").is_file() and (path / "postgres").is_file():
            return path
    raise PostgresUnavailable(
        "no PostgreSQL binaries found in /usr/lib/postgresql/*/bin; install Debian's "
        "postgresql package (e.g. apt-get install postgresql-15) or set RESUMEFLOW_PG_BIN")


def _version_key(name: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in name.split("."))
    except ValueError:
        return (0,)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """A throw-away PostgreSQL cluster on 127.0.0.1; a context manager.

    Args:
        database: the database created at start (``dsn`` points to it).
        start_timeout_s: how long to wait for the server to accept connections.
        user: the OS user that runs the server when this process runs as root.
    """

    def __init__(self, *, database: str = "resumeflow", start_timeout_s: float = 30.0,
                 user: str = "postgres") -> None:
        self.bin = find_pg_bin()
        self.database = database
        self.start_timeout_s = start_timeout_s
        self._as_root = os.geteuid() == 0
        self._user = user
        if self._as_root and shutil.which("runuser") is None:
            raise PostgresUnavailable("running as root without `runuser` to start PostgreSQL "
                                      "as an unprivileged user; install util-linux")
        self.directory = Path(tempfile.mkdtemp(prefix="resumeflow-pg-"))
        self.data = self.directory / "data"
        self.port = _free_port()
        self.superuser = user if self._as_root else _current_user()
        self._proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        try:
            if self._as_root:
                shutil.chown(self.directory, user=user, group=None)
            self._initdb()
            self.start()
            self._createdb(database)
        except BaseException:
            self.close()
            raise

    # -- addresses -------------------------------------------------------------------------

    def dsn_for(self, database: str) -> str:
        """A libpq connection string for ``database`` over TCP on 127.0.0.1 (no password)."""
        return (f"host=127.0.0.1 port={self.port} user={self.superuser} dbname={database} "
                "connect_timeout=5")

    @property
    def dsn(self) -> str:
        """The connection string of the database created at start."""
        return self.dsn_for(self.database)

    # -- lifecycle -------------------------------------------------------------------------

    def _cmd(self, *args: str) -> list[str]:
        if self._as_root:
            return ["runuser", "-u", self._user, "--", *args]
        return list(args)

    def _initdb(self) -> None:
        result = subprocess.run(
            self._cmd(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust",
                      "-U", self.superuser, "-E", "UTF8", "--no-instructions", "--no-sync"),
            capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            raise PostgresUnavailable(f"initdb failed ({result.returncode}): "
                                      f"{(result.stderr or result.stdout).strip()[-2000:]}")
        with open(self.data / "pg_hba.conf", "w") as f:
            f.write("local all all trust\nhost all all 127.0.0.1/32 trust\n")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the server on the same data directory and port; waits until it is ready."""
        if self.running:
            return
        log_file = open(self.directory / "server.log", "ab")  # noqa: SIM115 (kept by Popen)
        try:
            self._proc = subprocess.Popen(
                self._cmd(str(self.bin / "postgres"), "-D", str(self.data),
                          "-c", "listen_addresses=127.0.0.1", "-c", f"port={self.port}",
                          "-c", f"unix_socket_directories={self.directory}",
                          "-c", "fsync=off", "-c", "full_page_writes=off",
                          "-c", "max_connections=200", "-c", "shared_buffers=32MB",
                          "-c", "log_min_messages=warning"),
                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log_file.close()
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise PostgresUnavailable(
                    f"postgres exited with {self._proc.returncode} at start: "
                    f"{self.log_tail()}")
            ready = subprocess.run(
                [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port),
                 "-d", "postgres", "-U", self.superuser, "-t", "1"],
                capture_output=True, check=False)
            if ready.returncode == 0:
                return
            time.sleep(0.05)
        raise PostgresUnavailable(f"postgres did not accept connections within "
                                  f"{self.start_timeout_s} s: {self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return (self.directory / "server.log").read_text(errors="replace")[-chars:]
        except OSError:
            return "(no server log)"

    def stop(self, *, mode: str = "fast") -> None:
        """Stop the server: ``fast`` (SIGINT: roll back open transactions, close connections),
        ``immediate`` (SIGQUIT: like a crash; recovery runs at the next start)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            sig = signal.SIGQUIT if mode == "immediate" else signal.SIGINT
            # ``proc`` is runuser (as root) or the postmaster: signal the postmaster itself
            # (its backends share the process group and read SIGINT as "cancel query").
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._postmaster_pid() or proc.pid, sig)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self._proc = None

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def restart(self, *, down_s: float = 0.0, mode: str = "fast") -> None:
        """Stop, stay down ``down_s`` seconds, start again on the same port and data."""
        self.stop(mode=mode)
        if down_s:
            time.sleep(down_s)
        self.start()
        self.restarts += 1

    def _psql(self, sql: str, database: str = "postgres") -> None:
        result = subprocess.run(
            [str(self.bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port),
             "-U", self.superuser, "-d", database, "-v", "ON_ERROR_STOP=1", "-q", "-c", sql],
            capture_output=True, text=True, timeout=60, check=False)
        if result.returncode != 0:
            raise PostgresUnavailable(f"psql failed: {result.stderr.strip()}")

    def _createdb(self, name: str) -> None:
        self._psql(f'CREATE DATABASE "{name}"')

    def create_database(self, name: str) -> str:
        """Create database ``name`` (a plain identifier); returns its DSN."""
        if not name.replace("_", "").isalnum():
            raise ValueError(f"database name {name!r} must be letters, digits, underscores")
        self._createdb(name)
        return self.dsn_for(name)

    def close(self) -> None:
        """Stop the server and remove its directory; safe to call twice."""
        try:
            self.stop(mode="immediate")
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _current_user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name
