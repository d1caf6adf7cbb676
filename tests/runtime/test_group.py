"""Workers of a group on a real Kafka broker and a real PostgreSQL store: partitions move when
a worker dies, pauses or the broker restarts, and the keyed running sums land exactly once.

Each test writes a pipeline (Kafka source with a six-partition topic, a keyed running sum, the
exactly-once ``KafkaSink`` read back with read_committed, or JSON-lines files), produces its
input, starts ``resumeflow worker`` processes that share one store (``PostgresStore``, or one
SQLite file), breaks something, waits for the output to be complete, stops the workers with
SIGTERM and compares the output with a straight-Python reference: every input record's effect
exactly once (0 lost, 0 duplicated). The workers' logs are attached to every failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

PARTITIONS = 6
KEYS_PER_PARTITION = 8

_PIPELINE = '''\
"""Keyed running sums from Kafka, written by the test suite."""
import time

import resumeflow as rf
from resumeflow.sources import KafkaSource

TOPIC = {topic!r}
BOOTSTRAP = {bootstrap!r}
GROUP = {group!r}
OUT = {out!r}
OUT_TOPIC = {out_topic!r}
PACE_S = {pace_s!r}
CONSUMER = {consumer!r}


def pace(event):
    time.sleep(PACE_S)  # keeps the run long enough for faults to land mid-way
    return event


def flow():
    f = rf.Flow("group-sums")
    (f.source(KafkaSource(TOPIC, bootstrap=BOOTSTRAP, group_id=GROUP, config=CONSUMER))
      .map(pace)
      .key_by(lambda e: e["k"])
      .stateful_map(lambda s, e: (s + e["v"], {{"id": e["id"], "sum": s + e["v"]}}), initial=0)
      .sink(rf.sinks.KafkaSink(OUT_TOPIC, bootstrap=BOOTSTRAP) if OUT_TOPIC
            else rf.sinks.JsonLinesSink(OUT, with_key=False)))
    return f
'''


class Cluster:
    """A topic, its input, a pipeline file and the worker processes running it."""

    def __init__(self, root: Path, bootstrap: str, dsn: str, *, per_partition: int,
                 pace_s: float, session_timeout_ms: int = 3000, sink: str = "jsonl") -> None:
        from resumeflow.testing._kafka_broker import create_topic, produce_json

        self.root = root
        self.bootstrap = bootstrap
        self.dsn = dsn
        tag = uuid.uuid4().hex[:8]
        self.topic = f"sums-in-{tag}"
        create_topic(bootstrap, self.topic, PARTITIONS)
        self.out_topic = f"sums-out-{tag}" if sink == "kafka" else ""
        if self.out_topic:
            create_topic(bootstrap, self.out_topic, PARTITIONS)
        self.events: dict[int, list[dict[str, Any]]] = {}
        n = 0
        for p in range(PARTITIONS):
            rows = []
            for i in range(per_partition):
                rows.append({"id": n, "k": f"k{p}-{i % KEYS_PER_PARTITION}", "v": (n * 7) % 11})
                n += 1
            produce_json(bootstrap, self.topic, rows, partition=p)
            self.events[p] = rows
        self.total = n
        self.spec = self._write_pipeline(tag, pace_s, session_timeout_ms)
        self.workers: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def _write_pipeline(self, tag: str, pace_s: float, session_timeout_ms: int) -> str:
        path = self.root / "pipeline.py"
        consumer = {"session.timeout.ms": session_timeout_ms,
                    "heartbeat.interval.ms": max(100, session_timeout_ms // 10)}
        path.write_text(_PIPELINE.format(
            topic=self.topic, bootstrap=self.bootstrap, group=f"sums-{tag}",
            out=str(self.root / "out-{partition}.jsonl"), out_topic=self.out_topic,
            pace_s=pace_s, consumer=consumer))
        return f"{path}:flow"

    # -- workers -------------------------------------------------------------------------

    def start(self, *extra: str) -> int:
        """Start one worker; returns its index."""
        index = len(self.workers)
        log = self.root / f"worker{index}.log"
        args = [sys.executable, "-m", "resumeflow.cli", "worker", self.spec, "--store", self.dsn,
                "--dead-letters", str(self.root / "dead-{partition}.jsonl"), "--no-progress",
                "--worker-id", f"w{index}", "--replay-max-seconds", "0.2", *extra]
        with open(log, "wb") as out:
            self.workers.append(subprocess.Popen(args, cwd=self.root, stdout=out, stderr=out))
        self.logs.append(log)
        return index

    def log(self, index: int) -> str:
        return self.logs[index].read_text(errors="replace")

    def mark_kill(self) -> None:
        """Remember how long each log is now (what a worker logs after a kill)."""
        self._marks = [len(p.read_bytes()) for p in self.logs]

    def after_kill(self, index: int) -> str:
        return self.logs[index].read_bytes()[self._marks[index]:].decode(errors="replace")

    def signal(self, index: int, sig: signal.Signals) -> None:
        os.kill(self.workers[index].pid, sig)

    def stop_all(self, timeout_s: float = 30.0) -> list[int | None]:
        """SIGTERM every live worker and wait; returns the exit codes."""
        for w in self.workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        codes = []
        for w in self.workers:
            try:
                codes.append(w.wait(timeout_s))
            except subprocess.TimeoutExpired:
                w.kill()
                codes.append(w.wait())
        return codes

    def kill_all(self) -> None:
        for w in self.workers:
            if w.poll() is None:
                with_suppressed(lambda w=w: w.send_signal(signal.SIGCONT))
                w.kill()
                w.wait()

    def committed(self) -> set[int]:
        """Partitions whose task has a commit record in the shared store."""
        from resumeflow.cli._worker import open_store

        store = open_store(self.dsn, keep_checkpoints=10)
        try:
            return {int(t.task.rsplit(":", 1)[1]) for t in store.tasks()
                    if t.record is not None and t.record.seq > 0}
        finally:
            store.close()

    def held(self, index: int) -> set[int]:
        """Partitions a worker holds, from its log."""
        held: set[int] = set()
        text = self.log(index)
        for m in re.finditer(r"recovered task group-sums:[^:]+:(\d+) |released task "
                             r"group-sums:[^:]+:(\d+) |task group-sums:[^:]+:(\d+) is fenced",
                             text):
            if m.group(1) is not None:
                held.add(int(m.group(1)))
            else:
                held.discard(int(m.group(2) or m.group(3)))
        return held

    def diagnostics(self) -> str:
        """The tail of each worker's log, runs of alike lines (the client's reconnects)
        folded into one."""
        parts = []
        for i, log in enumerate(self.logs):
            text = log.read_text(errors="replace") if log.exists() else "(no log)"
            parts.append(f"---- worker {i} (exit {self.workers[i].poll()}) ----\n"
                         + "\n".join(_fold(text.splitlines())[-120:]))
        return "\n".join(parts)

    def dump_stacks(self) -> None:
        """Make every live worker print its threads' stacks into its log (SIGUSR1)."""
        live = [w for w in self.workers if w.poll() is None]
        for w in live:
            with_suppressed(lambda w=w: w.send_signal(signal.SIGUSR1))
        if live:
            time.sleep(1.0)

    # -- output --------------------------------------------------------------------------

    def output(self) -> list[dict[str, Any]]:
        """Every output record: committed Kafka output (read_committed) or the files."""
        if self.out_topic:
            from resumeflow.testing._kafka_broker import read_topic

            return [m.value for m in read_topic(self.bootstrap, self.out_topic)]
        rows = []
        for path in sorted(self.root.glob("out-*.jsonl")):
            rows.extend(json.loads(line) for line in path.read_bytes().splitlines())
        return rows

    def expected(self) -> dict[int, int]:
        """``{id: running sum}`` computed in straight Python."""
        out: dict[int, int] = {}
        for rows in self.events.values():
            sums: dict[str, int] = {}
            for r in rows:
                sums[r["k"]] = sums.get(r["k"], 0) + r["v"]
                out[r["id"]] = sums[r["k"]]
        return out

    def check_exactly_once(self) -> None:
        rows = self.output()
        seen: dict[int, int] = {}
        duplicated = 0
        for r in rows:
            if r["id"] in seen:
                duplicated += 1
            seen[r["id"]] = r["sum"]
        expected = self.expected()
        lost = len(set(expected) - set(seen))
        wrong = [i for i in seen if i in expected and seen[i] != expected[i]]
        assert (lost, duplicated, len(wrong)) == (0, 0, 0), (
            f"lost {lost}, duplicated {duplicated}, wrong sums {len(wrong)} of "
            f"{len(expected)}\n{self.diagnostics()}")

    def wait(self, condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                self.dump_stacks()
                raise AssertionError(f"timed out waiting for {what}\n{self.diagnostics()}")
            time.sleep(0.1)

    def progress(self) -> int:
        if self.out_topic:
            return len(self.output())
        # a poll can catch a worker's last line half-written: count only finished lines
        return sum(p.read_bytes().count(b"\n") for p in self.root.glob("out-*.jsonl"))


def _fold(lines: list[str]) -> list[str]:
    """``lines`` with each run of lines that differ only in their numbers kept once, with
    its count."""
    out: list[str] = []
    shape, count = None, 0
    for line in lines:
        this = re.sub(r"\d+", "N", line)
        if this == shape:
            count += 1
            continue
        if count > 1:
            out.append(f"    (the line above {count} times)")
        out.append(line)
        shape, count = this, 1
    if count > 1:
        out.append(f"    (the line above {count} times)")
    return out


def with_suppressed(action: Callable[[], Any]) -> None:
    with contextlib.suppress(OSError):
        action()


@pytest.fixture
def cluster_factory(kafka: Any, tmp_path: Path,
                    request: pytest.FixtureRequest) -> Iterator[Callable[..., Cluster]]:
    """Makes the test's ``Cluster`` (store: PostgreSQL, or ``store="sqlite"``: one SQLite
    file shared by the workers); kills whatever workers are left at the end."""
    made: list[Cluster] = []

    def make(*, store: str = "postgres", **kwargs: Any) -> Cluster:
        where = (str(tmp_path / "store.db") if store == "sqlite"
                 else request.getfixturevalue("postgres_dsn"))
        c = Cluster(tmp_path, kafka.bootstrap, where, **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        c.kill_all()


def summary_numbers(log: str) -> dict[str, int]:
    m = re.search(r"(\d+) rebalances, tasks gained (\d+) released (\d+) fenced (\d+)", log)
    assert m, log[-3000:]
    return dict(zip(("rebalances", "gained", "released", "fenced"), map(int, m.groups()),
                    strict=True))


@pytest.mark.parametrize(("store", "sink"), [("postgres", "kafka"), ("sqlite", "jsonl")])
def test_sigkilled_worker_partitions_move_and_output_is_exactly_once(
        cluster_factory: Callable[..., Cluster], store: str, sink: str) -> None:
    """Three workers share six partitions; one is SIGKILLed mid-run; the other two take its
    partitions, resume from its commit records, and every record lands exactly once (a shared
    PostgreSQL store with the exactly-once KafkaSink; and one SQLite file with JSON-lines
    output, whose progress marks make the new owner count the victim's replay through a
    second reader of the partition)."""
    c = cluster_factory(store=store, sink=sink, per_partition=600, pace_s=0.003)
    for _ in range(3):
        c.start()
    c.wait(lambda: all(c.held(i) for i in range(3)), "every worker to hold partitions")
    c.wait(lambda: c.progress() >= c.total // 5, "a fifth of the output")
    c.wait(lambda: bool(c.held(0) & c.committed()), "a commit of a partition worker 0 holds")
    victim = c.held(0)
    c.signal(0, signal.SIGKILL)
    c.workers[0].wait()
    c.mark_kill()
    c.wait(lambda: victim <= c.held(1) | c.held(2), "the survivors to take the partitions")
    c.wait(lambda: c.progress() >= c.total, "the whole output", timeout_s=90)
    codes = c.stop_all()
    assert codes[1:] == [0, 0], c.diagnostics()
    c.check_exactly_once()
    resumed = {int(p): seq for p, seq in re.findall(
        r"recovered task group-sums:[^:]+:(\d+) epoch \d+ from (?:no checkpoint|checkpoint "
        r"seq (\d+))", c.after_kill(1) + c.after_kill(2))}
    assert victim <= set(resumed), (victim, resumed, c.diagnostics())
    assert any(resumed[p] for p in victim), "no partition resumed from the victim's commits"
    for i in (1, 2):
        assert summary_numbers(c.log(i))["rebalances"] >= 2, c.log(i)


def test_paused_zombie_commits_are_refused_and_nothing_is_duplicated(
        cluster_factory: Callable[..., Cluster]) -> None:
    """A worker SIGSTOPped past its session timeout loses its partitions; once SIGCONTed its
    commits are refused as fenced (counted and logged) and the output stays exactly once."""
    c = cluster_factory(sink="kafka", per_partition=500, pace_s=0.003, session_timeout_ms=2000)
    # The zombie never commits on its own (huge window), so it has work to commit when it wakes.
    zombie = c.start("--replay-max-seconds", "600")
    other = c.start()
    c.wait(lambda: c.held(zombie) and c.held(other), "both workers to hold partitions")
    time.sleep(1.0)
    taken = c.held(zombie)
    c.signal(zombie, signal.SIGSTOP)
    c.wait(lambda: taken <= c.held(other), "the other worker to take the zombie's partitions")
    c.wait(lambda: c.progress() >= c.total // 2, "half of the output")
    c.signal(zombie, signal.SIGCONT)
    c.wait(lambda: "is fenced" in c.log(zombie) or "already taken by another worker"
           in c.log(zombie), "the zombie's refused commit")
    # Awake again, it may rejoin and take partitions legitimately, which it would commit only
    # at its stop (huge window): stop it, so the other worker finishes everything.
    c.signal(zombie, signal.SIGTERM)
    assert c.workers[zombie].wait(30) == 0, c.diagnostics()
    c.wait(lambda: c.progress() >= c.total, "the whole output", timeout_s=90)
    codes = c.stop_all()
    assert codes == [0, 0], c.diagnostics()
    c.check_exactly_once()
    assert summary_numbers(c.log(zombie))["fenced"] >= 1, c.log(zombie)
    assert "refused" in c.log(zombie)


def test_broker_restart_mid_run_loses_and_duplicates_nothing(
        cluster_factory: Callable[..., Cluster], kafka: Any) -> None:
    """Stopping and restarting the broker mid-run makes the workers retry and resume; every
    record still lands exactly once."""
    c = cluster_factory(sink="kafka", per_partition=500, pace_s=0.003, session_timeout_ms=3000)
    for _ in range(2):
        c.start()
    c.wait(lambda: c.held(0) and c.held(1), "both workers to hold partitions")
    c.wait(lambda: c.progress() >= c.total // 4, "a quarter of the output")
    kafka.stop()
    time.sleep(4.0)
    kafka.start()
    c.wait(lambda: c.progress() >= c.total, "the whole output", timeout_s=120)
    codes = c.stop_all()
    assert codes == [0, 0], c.diagnostics()
    c.check_exactly_once()
    retried = [int(n) for n in re.findall(r"retries: source (\d+)", c.log(0) + c.log(1))]
    assert len(retried) == 2 and all(n > 0 for n in retried), c.diagnostics()
    assert "the client retries by itself" in c.log(0), c.diagnostics()
