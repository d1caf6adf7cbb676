"""The resumeflow demo: kill -9 a pipeline half-way, resume it, and check every record.

Run it with ``make demo`` (or ``python examples/demo.py`` inside the project's environment).
It recreates ``demo-data/``, writes 1,000,000 orders, runs ``examples/orders.py:flow`` with the
``resumeflow`` command, SIGKILLs it once about half the input is committed, shows what the store
holds, runs the same command again and checks ``totals.jsonl`` against a plain Python
computation over the input. The exit status is non-zero if any record is lost, duplicated or
wrong, or if replay went past its bound.
"""

from __future__ import annotations

import array
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
from rich.console import Console

import resumeflow as rf

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "demo-data"
ORDERS = DATA_DIR / "orders.jsonl"
TOTALS = DATA_DIR / "totals.jsonl"
STORE = DATA_DIR / "store.db"

EVENTS = 1_000_000
CUSTOMERS = 5_000
CHUNK = 100_000
SEED = 20_240_601
KILL_AT = 0.45
"""Kill once the last checkpoint covers this share of the input file..."""
KILL_DELAY_S = 0.05
"""...and this long after it was seen: in the middle of the next replay window."""

RUN_TIMEOUT_S = 120.0

console = Console(highlight=False, soft_wrap=True)


class Order(msgspec.Struct):
    id: int
    customer: str
    amount: int
    status: str


class Total(msgspec.Struct):
    id: int
    customer: str
    total: int


@dataclass(frozen=True, kw_only=True)
class Check:
    """The outcome of comparing the output with the expected one."""

    expected: int
    lost: int
    duplicated: int
    wrong: int


class DemoFailure(Exception):
    """The demo could not show what it set out to show."""


def cli(*args: str) -> list[str]:
    """The ``resumeflow`` command, run with the interpreter running this demo."""
    return [sys.executable, "-m", "resumeflow.cli", *args]


RUN = cli("run", "examples/orders.py:flow", "--store", str(STORE.relative_to(ROOT)),
          "--no-progress")


def step(text: str) -> None:
    console.print(f"\n[bold cyan]▶[/] [bold]{text}[/]")


def show(lines: str, style: str = "dim") -> None:
    for line in lines.strip("\n").splitlines():
        console.print(f"  {line}", style=style, markup=False)


# -- 1. the input --------------------------------------------------------------------------


def generate() -> None:
    """Write EVENTS orders in chunks; about 5% are refunds, which the flow filters out."""
    rng = random.Random(SEED)
    customers = [f"c{n:04d}" for n in range(CUSTOMERS)]
    amounts = range(100, 20_000)
    with open(ORDERS, "w", encoding="ascii") as out:
        for start in range(0, EVENTS, CHUNK):
            n = min(CHUNK, EVENTS - start)
            who = rng.choices(customers, k=n)
            cents = rng.choices(amounts, k=n)
            status = rng.choices(("paid", "refunded"), weights=(19, 1), k=n)
            out.write("".join(
                f'{{"id":{start + i},"customer":"{who[i]}","amount":{cents[i]},'
                f'"status":"{status[i]}"}}\n'
                for i in range(n)
            ))


# -- 2. run and kill -----------------------------------------------------------------------


def start_run(log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, RESUMEFLOW_DEMO_DIR=str(DATA_DIR))
    with open(log, "wb") as stderr:
        return subprocess.Popen(RUN, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=stderr)


def committed_share(store: rf.SQLiteStore, input_bytes: int) -> float:
    """Share of the input file below the position of the newest checkpoint."""
    shares = [0.0]
    for task in store.tasks():
        if task.record is not None:
            shares.extend(int(p) / input_bytes for p in task.record.positions.values())
    return max(shares)


def run_and_kill() -> float:
    """Start the flow, SIGKILL it mid-way; returns the committed share at the kill."""
    input_bytes = ORDERS.stat().st_size
    began = time.monotonic()
    proc = start_run(DATA_DIR / "run1.log")
    store: rf.SQLiteStore | None = None
    try:
        while True:
            if proc.poll() is not None:
                raise DemoFailure(f"the first run ended by itself (exit {proc.returncode}) "
                                  "before it could be killed; see demo-data/run1.log")
            if time.monotonic() - began > RUN_TIMEOUT_S:
                raise DemoFailure("the first run made no visible progress; see run1.log")
            if store is None and STORE.exists():
                store = rf.SQLiteStore(STORE, create=False)
            share = committed_share(store, input_bytes) if store is not None else 0.0
            if share >= KILL_AT:
                time.sleep(KILL_DELAY_S)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if store is not None:
            store.close()
    console.print(f"  [bold red]SIGKILL[/] after {time.monotonic() - began:.1f} s "
                  f"(exit {proc.returncode}); the last checkpoint seen covered "
                  f"{share:.0%} of the input")
    show((DATA_DIR / "run1.log").read_text())
    return share


def show_store() -> None:
    """Summarize ``resumeflow status --json`` and ``resumeflow checkpoints verify``."""
    store = str(STORE.relative_to(ROOT))
    status = subprocess.run(cli("status", "--store", store, "--json"), cwd=ROOT,
                            capture_output=True, text=True, check=False)
    if status.returncode:
        show(status.stderr)
        raise DemoFailure("`resumeflow status` could not read the store")
    input_bytes = ORDERS.stat().st_size
    for task in json.loads(status.stdout):
        position = max(task["positions"].values(), default=0)
        console.print(
            f"  task {task['task']}: checkpoint seq {task['seq']} (epoch {task['epoch']}, "
            f"{task['checkpoint_age_s']} s old, {task['checkpoints_kept']} kept)\n"
            f"    input position {position:,} of {input_bytes:,} bytes "
            f"({position / input_bytes:.0%}), {task['records_in']:,} records in, "
            f"{task['state_keys']:,} state keys, {task['dead_letters']} dead letters")
    verify = subprocess.run(cli("checkpoints", "verify", "--store", store), cwd=ROOT,
                            capture_output=True, text=True, check=False)
    show(verify.stdout + verify.stderr, style="")
    if verify.returncode:
        raise DemoFailure("the checkpoint chain did not verify")
    lines = TOTALS.read_bytes().count(b"\n") if TOTALS.exists() else 0
    console.print(f"  {TOTALS.relative_to(ROOT)}: {lines:,} lines, all from committed "
                  "checkpoints (uncommitted output is never appended)")


# -- 3. resume -----------------------------------------------------------------------------


def resume() -> str:
    """Run the same command again to the end; returns its stderr."""
    began = time.monotonic()
    log = DATA_DIR / "run2.log"
    proc = start_run(log)
    try:
        proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise DemoFailure("the resumed run did not finish; see demo-data/run2.log") from None
    text = log.read_text()
    show(text)
    if proc.returncode != 0:
        raise DemoFailure(f"the resumed run failed with exit {proc.returncode}")
    console.print(f"  finished in {time.monotonic() - began:.1f} s (process start to exit)")
    return text


# -- 4. check ------------------------------------------------------------------------------


def check() -> Check:
    """Compare totals.jsonl with the running totals computed straight from the input."""
    expected_total = array.array("q", [-1]) * EVENTS
    expected_customer: list[str | None] = [None] * EVENTS
    totals: dict[str, int] = {}
    decode_order = msgspec.json.Decoder(Order).decode
    expected = 0
    with open(ORDERS, "rb") as lines:
        for line in lines:
            order = decode_order(line)
            if order.status != "paid":
                continue
            total = totals.get(order.customer, 0) + order.amount
            totals[order.customer] = total
            expected_total[order.id] = total
            expected_customer[order.id] = order.customer
            expected += 1

    seen = bytearray(EVENTS)
    wrong = 0
    decode_total = msgspec.json.Decoder(Total).decode
    with open(TOTALS, "rb") as lines:
        for line in lines:
            try:
                out = decode_total(line)
            except msgspec.DecodeError:
                wrong += 1
                continue
            if not 0 <= out.id < EVENTS or expected_total[out.id] < 0:
                wrong += 1
                continue
            seen[out.id] = min(seen[out.id] + 1, 255)
            if out.total != expected_total[out.id] or out.customer != expected_customer[out.id]:
                wrong += 1
    lost = sum(1 for i in range(EVENTS) if expected_total[i] >= 0 and seen[i] == 0)
    duplicated = sum(n - 1 for n in seen if n > 1)
    return Check(expected=expected, lost=lost, duplicated=duplicated, wrong=wrong)


def number(pattern: str, text: str) -> float | None:
    match = re.search(pattern, text)
    return float(match.group(1)) if match else None


def report(result: Check, run2: str) -> bool:
    """Print the verdict; True when every invariant holds."""
    replayed = number(r"replayed (\d+)", run2)
    bound = number(r"replay bound (\d+) records", run2)
    ready_ms = number(r"ready in ([\d.]+) ms", run2)
    first_ms = number(r"first record after ([\d.]+) ms", run2)
    replay_ok = replayed is not None and bound is not None and replayed <= bound

    def row(name: str, value: str, ok: bool) -> None:
        mark = "[green]✓[/]" if ok else "[bold red]✗[/]"
        console.print(f"  {mark} {name:<20} {value}")

    console.print(f"  {result.expected:,} paid orders expected in {TOTALS.relative_to(ROOT)}")
    row("records lost", f"{result.lost:,}", result.lost == 0)
    row("records duplicated", f"{result.duplicated:,}", result.duplicated == 0)
    row("wrong totals", f"{result.wrong:,}", result.wrong == 0)
    row("records replayed", "unknown" if replayed is None else
        f"{replayed:,.0f} (bound {bound:,.0f}: the records read after the last checkpoint)",
        replay_ok)
    resume_text = "unknown" if first_ms is None or ready_ms is None else (
        f"{first_ms:.1f} ms from taking the task to its first record processed "
        f"(recovery: {ready_ms:.1f} ms of it)")
    row("time to resume", resume_text, first_ms is not None)
    return (result.lost == 0 and result.duplicated == 0 and result.wrong == 0
            and replay_ok)


# -- the demo ------------------------------------------------------------------------------


def main() -> int:
    began = time.monotonic()
    console.print("[bold]resumeflow demo[/]: kill -9 a running pipeline, resume it, "
                  "check every record")
    shutil.rmtree(DATA_DIR, ignore_errors=True)
    DATA_DIR.mkdir()

    step(f"Writing {EVENTS:,} orders of {CUSTOMERS:,} customers")
    t = time.monotonic()
    generate()
    console.print(f"  {ORDERS.relative_to(ROOT)}: {ORDERS.stat().st_size / 1e6:.0f} MB "
                  f"in {time.monotonic() - t:.1f} s")
    try:
        step("Running  resumeflow run examples/orders.py:flow --store demo-data/store.db")
        run_and_kill()

        step("What the store holds now  (resumeflow status --json; checkpoints verify)")
        show_store()

        step("Running the same command again: it resumes from the last checkpoint")
        run2 = resume()

        step("Checking the output against a straight Python computation over the input")
        ok = report(check(), run2)
    except DemoFailure as exc:
        console.print(f"\n[bold red]demo failed:[/] {exc}")
        return 1
    took = time.monotonic() - began
    if ok:
        console.print(f"\n[bold green]Every order is in the output exactly once.[/] "
                      f"Demo took {took:.1f} s; data in {DATA_DIR.relative_to(ROOT)}/")
        return 0
    console.print(f"\n[bold red]The output is wrong[/] (demo took {took:.1f} s); "
                  f"inspect {DATA_DIR.relative_to(ROOT)}/ and run2.log")
    return 1


if __name__ == "__main__":
    sys.exit(main())
