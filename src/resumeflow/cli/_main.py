"""The ``resumeflow`` command: run a flow, inspect and verify its store.

Exit codes: 0 done, 1 failure, 2 bad usage or configuration (nothing was processed),
3 fenced (another worker owns a task), 4 damaged checkpoints found by ``verify``.
"""

from __future__ import annotations

import faulthandler
import importlib.util
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..checkpoint import SQLiteStore
from ..errors import FencedError, ResumeflowError, UsageError
from ..flow import Flow
from ..runtime import Progress, RunConfig, Runtime
from ._verify import verify_chain

__all__ = ["load_flow", "main"]

DEFAULT_STORE = "resumeflow.db"
# Task ids, paths and messages are printed as they are: no emoji codes (":x:" in a task id)
# and no markup ("[ab]" in a glob); the only markup is ours, and every value is escaped.
err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200, emoji=False)


def load_flow(spec: str) -> Flow:
    """Load ``FILE.py:ATTR``: a ``Flow`` or a function without arguments that returns one."""
    path_text, sep, attr = spec.rpartition(":")
    if not sep or not attr or not path_text:
        raise click.BadParameter(f"{spec!r}: expected FILE.py:ATTR, e.g. pipeline.py:flow")
    path = Path(path_text)
    if not path.is_file():
        raise click.BadParameter(f"{path_text!r} does not exist or is not a file")
    module_name = f"_resumeflow_user_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise click.BadParameter(f"{path_text!r} cannot be imported as Python")
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(path.resolve().parent))
    sys.modules[module_name] = module
    module_spec.loader.exec_module(module)
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise click.BadParameter(f"{path_text!r} has no attribute {attr!r}") from None
    if callable(obj) and not isinstance(obj, Flow):
        obj = obj()
    if not isinstance(obj, Flow):
        raise click.BadParameter(f"{spec!r} is a {type(obj).__name__}, not a resumeflow Flow")
    return obj


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("resumeflow: %(message)s"))
    root = logging.getLogger("resumeflow")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FencedError as exc:
            err.print(f"[bold red]fenced:[/] {escape(str(exc))}")
            sys.exit(3)
        except UsageError as exc:
            err.print(f"[bold red]configuration error:[/] {escape(str(exc))}")
            sys.exit(2)
        except ResumeflowError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}")
            sys.exit(1)


@click.group(cls=_Group)
@click.version_option(package_name="resumeflow")
def main() -> None:
    """Stream processing that resumes exactly where it left off.

    A running command prints every thread's stack to stderr on SIGUSR1 (kill -USR1 PID), to
    see where a stuck worker waits.
    """
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)


@main.command()
@click.argument("flow_spec", metavar="FILE.py:ATTR")
@click.option("--store", default=DEFAULT_STORE, show_default=True,
              help="SQLite store for checkpoints and state.")
@click.option("--guarantee", type=click.Choice(["exactly-once", "at-least-once"]),
              default="exactly-once", show_default=True)
@click.option("--replay-max-events", type=int, default=100_000, show_default=True,
              help="Commit before more records than this are uncommitted.")
@click.option("--replay-max-seconds", type=float, default=0.1, show_default=True,
              help="Commit once the oldest uncommitted record is this old.")
@click.option("--keep-checkpoints", type=int, default=10, show_default=True)
@click.option("--max-attempts", type=int, default=3, show_default=True,
              help="Attempts of user code on a record before it is dead-lettered.")
@click.option("--follow", is_flag=True, help="Keep reading as input files grow.")
@click.option("--progress/--no-progress", default=None,
              help="Live progress line (default: when stderr is a terminal).")
@click.option("-v", "--verbose", is_flag=True)
def run(flow_spec: str, store: str, guarantee: str, replay_max_events: int,
        replay_max_seconds: float, keep_checkpoints: int, max_attempts: int, follow: bool,
        progress: bool | None, verbose: bool) -> None:
    """Run FILE.py:ATTR until its inputs end, resuming from the store's checkpoints."""
    started = time.monotonic()
    _setup_logging(verbose)
    flow = load_flow(flow_spec)
    config = RunConfig(guarantee=guarantee,  # type: ignore[arg-type]
                       replay_max_events=replay_max_events,
                       replay_max_seconds=replay_max_seconds, keep_checkpoints=keep_checkpoints,
                       max_attempts=max_attempts, follow=follow)
    show = err.is_terminal if progress is None else progress
    runtime = Runtime(flow, store, config, progress=_progress_line if show else None)
    summary = runtime.run()
    if show:
        err.print(" " * 80, end="\r")
    first = summary.time_to_first_record_s
    err.print(
        f"resumeflow: {summary.records_in} records in {summary.elapsed_s:.2f} s "
        f"({summary.records_in / max(summary.elapsed_s, 1e-9):,.0f}/s), {summary.commits} "
        f"commits (median {summary.commit_p50_s * 1e3:.1f} ms), replayed "
        f"{summary.records_replayed}, dead letters {summary.dead_letters}, restarts "
        f"{summary.restarts}, first record after "
        f"{'-' if first is None else f'{first * 1e3:.1f} ms'}, process time "
        f"{time.monotonic() - started:.2f} s"
        + (f"; stopped by {summary.stopped_by} after committing" if summary.stopped_by else "")
    )


def _progress_line(p: Progress) -> None:
    age = "-" if p.last_commit_age_s is None else f"{p.last_commit_age_s:.2f} s"
    err.print(f"records {p.records_in:,}  {p.records_per_s:,.0f}/s  commits {p.commits}  "
              f"last commit {age} ago", end="\r")


def _open_existing(store: str) -> Any:
    """The store ``--store`` names, for inspection: a SQLite file that must exist, or a
    PostgreSQL database given by its DSN (``postgresql://...`` or ``host=... dbname=...``)."""
    from ._worker import is_dsn, open_store

    if is_dsn(store):
        return open_store(store, keep_checkpoints=10)
    return SQLiteStore(store, create=False)


def _shown(store: str) -> str:
    """``store`` as it may be printed: a DSN loses its password."""
    from ._worker import is_dsn

    if not is_dsn(store):
        return store
    try:
        from psycopg.conninfo import conninfo_to_dict, make_conninfo
    except ImportError:
        return "PostgreSQL store"
    try:
        params = conninfo_to_dict(store)
    except Exception:
        return "PostgreSQL store"
    params.pop("password", None)
    return make_conninfo(**{k: str(v) for k, v in params.items() if v is not None})


@main.command()
@click.option("--store", default=DEFAULT_STORE, show_default=True,
              help="A SQLite store file, or a PostgreSQL DSN.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def status(store: str, as_json: bool) -> None:
    """Per task: positions, seq, epoch, last checkpoint age, state keys, dead letters."""
    s = _open_existing(store)
    now = time.time()
    rows = []
    for t in s.tasks():
        r = t.record
        rows.append({
            "task": t.task, "epoch": t.epoch, "seq": r.seq if r else 0,
            "positions": r.positions if r else {},
            "checkpoint_age_s": round(now - r.created_at, 3) if r else None,
            "state_keys": sum(v for k, v in r.stats.items() if k.startswith("keys:")) if r else 0,
            "records_in": r.stats.get("records_in", 0) if r else 0,
            "dead_letters": r.stats.get("dead_letters", 0) if r else 0,
            "checkpoints_kept": t.checkpoints, "error": t.error,
        })
    s.close()
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table(title=escape(f"store {_shown(store)}"))
    for col in ("task", "epoch", "seq", "positions", "checkpoint age", "state keys",
                "records in", "dead letters"):
        table.add_column(col)
    for row in rows:
        age = "-" if row["checkpoint_age_s"] is None else f"{row['checkpoint_age_s']:.1f} s"
        table.add_row(*(escape(cell) for cell in (
            str(row["task"]), str(row["epoch"]), str(row["seq"]), json.dumps(row["positions"]),
            age, str(row["state_keys"]), str(row["records_in"]), str(row["dead_letters"]))))
    out.print(table)
    for row in rows:
        if row["error"]:
            problem = escape(f"task {row['task']}: {row['error']}")
            err.print(f"[bold red]{problem}[/]")


@main.group()
def checkpoints() -> None:
    """Inspect, verify and rewind checkpoints."""


@checkpoints.command("verify")
@click.option("--store", default=DEFAULT_STORE, show_default=True)
def verify_cmd(store: str) -> None:
    """Walk every task's digest chain; exit 4 on any damage."""
    s = _open_existing(store)
    damaged = 0
    for t in s.tasks():
        problems = verify_chain(t.task, s.records(t.task))
        if problems:
            damaged += 1
            for problem in problems:
                out.print(f"[bold red]DAMAGED[/] {escape(f'{t.task}: {problem}')}")
        else:
            out.print(escape(f"ok {t.task}: {t.checkpoints} checkpoint(s) verify"))
    s.close()
    if damaged:
        sys.exit(4)


@checkpoints.command("list")
@click.option("--store", default=DEFAULT_STORE, show_default=True)
def list_cmd(store: str) -> None:
    """List the kept checkpoints of every task."""
    from ..checkpoint import decode_record

    s = _open_existing(store)
    for t in s.tasks():
        for seq, raw in s.records(t.task):
            try:
                r = decode_record(raw)
                out.print(escape(f"{t.task} seq {seq} epoch {r.epoch} positions "
                                 f"{json.dumps(r.positions)} digest {r.digest[:12]}"))
            except ResumeflowError as exc:
                out.print(f"{escape(t.task)} seq {seq} [red]{escape(str(exc))}[/]")
    s.close()


@checkpoints.command("rewind")
@click.option("--store", default=DEFAULT_STORE, show_default=True)
@click.option("--task", "task", required=True, help="Task id, as shown by `status`.")
@click.option("--to", "seq", type=int, required=True, help="A kept checkpoint seq.")
def rewind_cmd(store: str, task: str, seq: int) -> None:
    """Make an earlier kept checkpoint the newest (stop the pipeline first). Logged."""
    _setup_logging(False)
    if seq < 1:
        raise click.BadParameter("--to must be a kept checkpoint seq (1 or more)")
    s = _open_existing(store)
    record = s.rewind(task, seq)
    s.close()
    assert record is not None
    out.print(escape(f"task {task} rewound to checkpoint seq {seq}, positions "
                     f"{json.dumps(record.positions)}; file sinks are cut back on the next run"))


@main.command()
@click.argument("flow_spec", metavar="FILE.py:ATTR")
@click.option("--kills", type=int, default=20, show_default=True, help="SIGKILLs to deliver.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the kill plan.")
@click.option("--store", default=None, help="Store of the killed runs (default: a scratch file).")
@click.option("--replay-max-events", type=int, default=100_000, show_default=True)
@click.option("--guarantee", type=click.Choice(["exactly-once", "at-least-once"]),
              default="exactly-once", show_default=True)
def chaos(flow_spec: str, kills: int, seed: int, store: str | None, replay_max_events: int,
          guarantee: str) -> None:
    """SIGKILL FILE.py:ATTR at random moments, restart it, and compare with a clean run."""
    from ._chaos import run_chaos, summarize

    if kills < 1:
        raise click.BadParameter("--kills must be at least 1")
    flow = load_flow(flow_spec)
    extra = ["--replay-max-events", str(replay_max_events), "--guarantee", guarantee]
    report = run_chaos(flow, flow_spec, kills=kills, seed=seed,
                       store=Path(store) if store else None, extra=extra,
                       replay_bound=replay_max_events, log=lambda m: err.print(escape(m)))
    table = Table(title=escape(f"chaos: {flow_spec} seed {seed}"))
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, value in summarize(report):
        table.add_row(escape(name), escape(value))
    out.print(table)
    violations = report.violations
    if guarantee == "at-least-once":
        violations = [v for v in violations if "duplicated" not in v]
    if violations:
        for v in violations:
            err.print(f"[bold red]VIOLATION[/] {escape(v)}")
        err.print(escape(f"replay with: resumeflow chaos {flow_spec} --kills {kills} "
                         f"--seed {seed}"))
        sys.exit(1)
    out.print("no violations")
