"""Kafka benchmarks of issue 5, measured in one run on one broker; writes docs/benchmarks.md.

1. Kafka to Kafka keyed running sum, exactly-once: resumeflow (KafkaSource -> key_by -> reduce
   -> exactly-once KafkaSink, SQLite store, default 100 ms / 100,000-record commit bound)
   against Quix Streams 3.28.1 with ``processing_guarantee="exactly-once"``, at its default
   5 s commit interval and at 100 ms, on the same broker, the same input topic (6 partitions),
   one process each. Contenders alternate; rounds repeat them; medians and ratios are quoted.
   Every run's output topic is read back with read_committed and checked: one output per input
   record, and every key's last running sum right.
2. Records replayed after a SIGKILL: each contender is killed once half the input is processed
   and started again; replayed = records processed by both runs - input records. The output is
   checked again (exactly-once: nothing lost, nothing duplicated).
3. Scale-out: one worker against three on the 6-partition topic, sharing a PostgreSQL store,
   with a sink that waits on outside I/O before each publication, per record, over one
   connection per worker (``--sink-us-per-record``).

Quix Streams runs in its own virtual environment under bench/.data (made on first use); it is
never a dependency of resumeflow. The broker is the test tooling's KRaft broker from Maven
Central jars.

    python bench/kafka.py            # 1,000,000 records, 3 rounds
    python bench/kafka.py --quick    # 200,000 records, 1 round (development)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = HERE / ".data" / "kafka"
QUIX_VENV = HERE / ".data" / "quix-venv"
QUIX_VERSION = "3.28.1"
KEYS = 10_000
PARTITIONS = 6
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- section: kafka -->", "<!-- end of section: kafka -->"
NOTES = "<!-- section: notes -->"

sys.path.insert(0, str(ROOT / "src"))

from resumeflow.testing._kafka_broker import (  # noqa: E402
    KafkaBroker,
    create_topic,
    read_topic,
)
from resumeflow.testing._pg_server import PostgresServer  # noqa: E402


def _quix_python() -> Path:
    python = QUIX_VENV / "bin" / "python"
    if not python.exists():
        print(f"making {QUIX_VENV} with quixstreams=={QUIX_VERSION} (benchmark only)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(QUIX_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q",
                        f"quixstreams=={QUIX_VERSION}"], check=True)
    return python


def _produce(bootstrap: str, topic: str, records: int) -> None:
    """Write the input: pre-encoded records, batched by the client (far faster than the test
    helper, so a consumer group is never starved by its producer)."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                         "linger.ms": 20, "queue.buffering.max.messages": 500_000})
    for i in range(records):
        key = f"k{i % KEYS}"
        value = f'{{"id": {i}, "key": "{key}", "v": {i % 97}}}'.encode()
        while True:
            try:
                producer.produce(topic, value=value, key=f'"{key}"'.encode())
                break
            except BufferError:
                producer.poll(0.05)
        if i % 10_000 == 0:
            producer.poll(0)
    if producer.flush(60):
        raise SystemExit(f"producing to {topic}: records left undelivered")


def _balanced(bootstrap: str, group: str, topic: str, workers: int,
              timeout_s: float = 120) -> None:
    """Wait until the group has ``workers`` members holding the topic's partitions evenly."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        description = admin.describe_consumer_groups([group])[group].result(timeout=10)
        held = [len([tp for tp in m.assignment.topic_partitions if tp.topic == topic])
                for m in description.members]
        if len(held) == workers and sum(held) == PARTITIONS and \
                max(held) - min(held) <= 1:
            return
        time.sleep(0.2)
    raise SystemExit(f"group {group} did not settle on {workers} members within {timeout_s} s")


def _expected(records: int) -> dict[str, int]:
    sums: dict[str, int] = {}
    for i in range(records):
        key = f"k{i % KEYS}"
        sums[key] = sums.get(key, 0) + i % 97
    return sums


class Run:
    """One contender process on fresh output, group and state."""

    def __init__(self, kind: str, bootstrap: str, in_topic: str, *, interval_s: float = 0.1,
                 delay_s: float = 0.0, out_topic: str | None = None, tag: str = "",
                 store: str | None = None) -> None:
        self.kind = kind
        self.bootstrap = bootstrap
        self.in_topic = in_topic
        self.tag = tag or uuid.uuid4().hex[:8]
        self.out_topic = out_topic or f"out-{self.tag}"
        if out_topic is None:
            create_topic(bootstrap, self.out_topic, PARTITIONS)
        self.group = f"g-{self.tag}"
        self.dir = DATA / self.tag
        self.dir.mkdir(parents=True, exist_ok=True)
        self.counter = self.dir / "counter"
        self.counter.write_bytes(bytes(16))
        self.interval_s = interval_s
        self.delay_s = delay_s
        self.store = store or str(self.dir / "store.db")

    def command(self) -> list[str]:
        if self.kind == "rf":
            return [sys.executable, str(HERE / "kafka_rf.py"), self.bootstrap, self.in_topic,
                    self.out_topic, self.group, self.store, str(self.counter),
                    str(self.delay_s)]
        return [str(_quix_python()), str(HERE / "kafka_quix.py"), self.bootstrap, self.in_topic,
                self.out_topic, self.group, str(self.dir / "state"), str(self.counter),
                str(self.interval_s)]

    def start(self) -> subprocess.Popen[str]:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        return subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env, cwd=self.dir)

    def processed(self) -> int:
        return int.from_bytes(self.counter.read_bytes()[:8], "little")

    def published(self) -> int:
        """Records the I/O-bound sink of the scale-out runs published (resumeflow only)."""
        return int.from_bytes(self.counter.read_bytes()[8:16], "little")


def _finish(proc: subprocess.Popen[str], what: str) -> dict[str, Any]:
    out, err = proc.communicate(timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed ({proc.returncode}):\n{err[-4000:]}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def _check(bootstrap: str, topic: str, records: int, expected: dict[str, int]) -> None:
    """The output holds one record per input record and every key's last sum is right."""
    messages = read_topic(bootstrap, topic, timeout_s=120)
    last: dict[str, int] = {}
    for m in messages:
        value = m.value
        if isinstance(value, dict) and "value" in value:
            key, total = value["key"], value["value"]
        else:
            key, total = m.key, value
        last[str(key)] = int(total)
    if len(messages) != records:
        raise SystemExit(f"{topic}: {len(messages):,} outputs for {records:,} inputs")
    wrong = [k for k, v in expected.items() if last.get(k) != v]
    if wrong:
        raise SystemExit(f"{topic}: {len(wrong)} keys with a wrong final sum, e.g. {wrong[:3]}")


def _throughput(bootstrap: str, topic: str, records: int, rounds: int,
                expected: dict[str, int]) -> dict[str, list[float]]:
    contenders = [("resumeflow", "rf", 0.1), ("quix-5s", "quix", 5.0),
                  ("quix-100ms", "quix", 0.1)]
    seconds: dict[str, list[float]] = {name: [] for name, _, _ in contenders}
    for round_no in range(rounds):
        order = contenders if round_no % 2 == 0 else list(reversed(contenders))
        for name, kind, interval in order:
            run = Run(kind, bootstrap, topic, interval_s=interval)
            result = _finish(run.start(), name)
            if result["processed"] != records:
                raise SystemExit(f"{name}: processed {result['processed']:,} of {records:,}")
            _check(bootstrap, run.out_topic, records, expected)
            seconds[name].append(result["seconds"])
            print(f"round {round_no + 1}/{rounds} {name:12s} {result['seconds']:7.2f} s "
                  f"{records / result['seconds']:>10,.0f} rec/s (output checked)", flush=True)
    return seconds


def _replay(bootstrap: str, topic: str, records: int,
            expected: dict[str, int]) -> dict[str, int]:
    replayed: dict[str, int] = {}
    for name, kind, interval in (("resumeflow", "rf", 0.1), ("quix-5s", "quix", 5.0),
                                 ("quix-100ms", "quix", 0.1)):
        run = Run(kind, bootstrap, topic, interval_s=interval)
        proc = run.start()
        deadline = time.monotonic() + 600
        while run.processed() < records // 2:
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read()[-3000:] if proc.stderr else ""
                raise SystemExit(f"{name} ended before half the input:\n{err}")
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        before = run.processed()
        _finish(run.start(), f"{name} after SIGKILL")
        total = run.processed()
        _check(bootstrap, run.out_topic, records, expected)
        replayed[name] = total - records
        print(f"{name:12s} killed at {before:,} processed; replayed {total - records:,} "
              f"(output exactly-once: checked)", flush=True)
    return replayed


def _scale(bootstrap: str, records: int, delay_s: float,
           expected: dict[str, int]) -> dict[int, float]:
    """Workers of one group share a PostgreSQL store, as on several machines. They start on an
    empty topic; once the group has settled (partitions spread evenly), the input is written."""
    rates: dict[int, float] = {}
    for workers in (1, 3):
        tag = uuid.uuid4().hex[:8]
        topic = f"scale-in-{tag}"
        create_topic(bootstrap, topic, PARTITIONS)
        server = PostgresServer(database=f"scale{tag}")
        server.start()
        runs = [Run("rf", bootstrap, topic, delay_s=delay_s, tag=f"{tag}-{i}",
                    out_topic=f"out-{tag}", store=server.dsn) for i in range(workers)]
        for run in runs[1:]:
            run.group = runs[0].group
        create_topic(bootstrap, f"out-{tag}", PARTITIONS)
        procs = [run.start() for run in runs]
        samples: list[tuple[float, int]] = []
        try:
            _balanced(bootstrap, runs[0].group, topic, workers)
            _produce(bootstrap, topic, records)
            while any(p.poll() is None for p in procs):
                samples.append((time.perf_counter(), sum(r.published() for r in runs)))
                time.sleep(0.1)
            results = [_finish(p, f"{workers} worker(s)") for p in procs]
        finally:
            server.close()
        done = sum(r["processed"] for r in results)
        _check(bootstrap, f"out-{tag}", records, expected)
        if done != records:
            raise SystemExit(f"{workers} workers processed {done:,} of {records:,}")
        rates[workers] = _steady_rate(samples, records)
        shares = ", ".join(f"{r['processed']:,}" for r in results)
        print(f"{workers} worker(s) processed {shares}", flush=True)
        print(f"{workers} worker(s): {rates[workers]:,.0f} records/s published between 20 % "
              "and 80 % of the input (output checked)", flush=True)
    return rates


def _steady_rate(samples: list[tuple[float, int]], records: int) -> float:
    """Records per second published while the output went from 20 % to 80 % of the input: the
    steady state, before the last partitions drain."""
    t20 = next(t for t, n in samples if n >= records * 0.2)
    t80 = next(t for t, n in samples if n >= records * 0.8)
    return records * 0.6 / max(t80 - t20, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200,000 records, 1 round")
    parser.add_argument("--records", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--only-scale", action="store_true",
                        help="measure the scale-out figure alone (prints, writes nothing)")
    parser.add_argument("--sink-us-per-record", type=float, default=100.0,
                        help="I/O wait of the scale-out sink per record, over one connection "
                             "per worker")
    opts = parser.parse_args()
    records = opts.records or (200_000 if opts.quick else 1_000_000)
    rounds = opts.rounds or (1 if opts.quick else 3)
    _quix_python()
    expected = _expected(records)
    with KafkaBroker() as broker:
        bootstrap = broker.bootstrap
        topic = "w1-in"
        create_topic(bootstrap, topic, PARTITIONS)
        began = time.perf_counter()
        _produce(bootstrap, topic, records)
        print(f"produced {records:,} records to {PARTITIONS} partitions in "
              f"{time.perf_counter() - began:.1f} s", flush=True)
        if opts.only_scale:
            _scale(bootstrap, records, opts.sink_us_per_record / 1e6, expected)
            return
        seconds = _throughput(bootstrap, topic, records, rounds, expected)
        replayed = _replay(bootstrap, topic, records, expected)
        rates = _scale(bootstrap, records, opts.sink_us_per_record / 1e6, expected)
    _write(opts, records, rounds, seconds, replayed, rates)


def _write(opts: argparse.Namespace, records: int, rounds: int, seconds: dict[str, list[float]],
           replayed: dict[str, int], rates: dict[int, float]) -> None:
    med = {name: statistics.median(s) for name, s in seconds.items()}
    rate = {name: records / s for name, s in med.items()}
    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, check=False).stdout.strip()
    command = "python bench/kafka.py" + (" --quick" if opts.quick else "") + \
        (f" --records {opts.records}" if opts.records else "") + \
        (f" --rounds {opts.rounds}" if opts.rounds else "")
    lines = [
        BEGIN,
        f"## Kafka: resumeflow against Quix Streams {QUIX_VERSION}, and scale-out",
        "",
        f"Written by `{command}` at {revision} on {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, one single-node KRaft broker (Kafka 4.1.1) on the same "
        f"machine. {records:,} records `{{\"id\", \"key\": \"k<i mod {KEYS}>\", \"v\"}}` on a "
        f"{PARTITIONS}-partition topic; keyed running sum, every update written to an output "
        "topic, exactly-once, one process. Medians of "
        f"{rounds} round(s), contenders alternating; every output was read back "
        "(read_committed) and checked.",
        "",
        "| contender | seconds (median) | records/s | resumeflow ÷ it |",
        "|---|---:|---:|---:|",
    ]
    for name in seconds:
        lines.append(f"| {name} | {med[name]:.2f} | {rate[name]:,.0f} | "
                     f"{rate['resumeflow'] / rate[name]:.2f}× |")
    lines += [
        "",
        "Goal: resumeflow ÷ Quix Streams exactly-once ≥ 1.5×.",
        "",
        "Records replayed after one SIGKILL at half the input (processed by both runs minus "
        "the input; output checked exactly-once after the restart):",
        "",
        "| contender | records replayed |",
        "|---|---:|",
        *[f"| {name} | {n:,} |" for name, n in replayed.items()],
        "",
        "Scale-out, same input, workers sharing a PostgreSQL store, with a sink that waits "
        f"{opts.sink_us_per_record:g} µs per record on I/O before each publication, over one "
        "connection per worker (`SlowKafkaSink` in bench/kafka_rf.py): one worker "
        f"{rates[1]:,.0f} records/s, three workers {rates[3]:,.0f} records/s: "
        f"**{rates[3] / rates[1]:.2f}×** (goal ≥ 2.5×).",
        END,
    ]
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    section = "\n".join(lines)
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + section + tail
    elif NOTES in text:
        head, tail = text.split(NOTES, 1)
        text = head + section + "\n" + NOTES + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    DOC.write_text(text)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
