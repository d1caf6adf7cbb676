"""The ``resumeflow`` command: status, verify, rewind, and bad configuration failing at start."""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import threading
import time
from typing import Any

import pytest

import resumeflow as rf
from resumeflow.checkpoint import SCHEMA_VERSION


def checkpointed(work: Any, n: int = 3000, kind: str = "jsonl", **kw: Any) -> Any:
    """A store with several checkpoints of the example flow; returns the events."""
    events = work.events(n, **kw)
    done = work.cli(*work.run_args(work.pipeline(events, kind), replay_max_events=500))
    assert done.returncode == 0, done.stderr
    return events


def damage_record(work: Any, seq: int) -> None:
    db = sqlite3.connect(work.store)
    (raw,) = db.execute("SELECT record FROM commits WHERE seq = ?", (seq,)).fetchone()
    edited = bytes(raw).replace(b'"epoch":1', b'"epoch":2')
    assert edited != bytes(raw)
    db.execute("UPDATE commits SET record = ? WHERE seq = ?", (edited, seq))
    db.commit()
    db.close()


def newest_seq(work: Any) -> int:
    store = rf.SQLiteStore(work.store, create=False)
    (status,) = store.tasks()
    store.close()
    return status.record.seq if status.record else 0


# -- inspection ---------------------------------------------------------------------------


def test_status_shows_each_task(work: Any) -> None:
    """``status`` lists the task with epoch, seq, positions, state keys and dead letters."""
    events = checkpointed(work, customers=23, bad_every=1000)
    seq = newest_seq(work)
    table = work.cli("status", "--store", str(work.store))
    assert table.returncode == 0, table.stderr
    for header in ("task", "epoch", "seq", "positions", "checkpoint age", "state keys",
                   "records in", "dead letters"):
        assert header in table.stdout
    assert "orders:events.jsonl:0" in table.stdout
    assert f'{{"0": {events.size}}}' in table.stdout

    as_json = work.cli("status", "--store", str(work.store), "--json")
    assert as_json.returncode == 0, as_json.stderr
    (task,) = json.loads(as_json.stdout)
    assert task["task"] == "orders:events.jsonl:0"
    assert task["epoch"] == 1 and task["seq"] == seq >= 6
    assert task["positions"] == {"0": events.size}
    assert task["state_keys"] == 23
    assert task["records_in"] == len(events.events) + len(events.bad)
    assert task["dead_letters"] == len(events.bad) == 3
    assert task["checkpoints_kept"] == min(seq, 10)
    assert 0 <= task["checkpoint_age_s"] < 120
    assert task["error"] is None


def test_verify_passes_on_a_sound_store_and_fails_with_4_on_damage(work: Any) -> None:
    """``checkpoints verify`` exits 0 when every chain verifies and 4 naming the damage."""
    checkpointed(work)
    sound = work.cli("checkpoints", "verify", "--store", str(work.store))
    assert sound.returncode == 0, sound.stdout + sound.stderr
    assert re.search(r"ok orders:events\.jsonl:0: \d+ checkpoint\(s\) verify", sound.stdout)

    seq = newest_seq(work) - 2
    damage_record(work, seq)
    damaged = work.cli("checkpoints", "verify", "--store", str(work.store))
    assert damaged.returncode == 4, damaged.stdout + damaged.stderr
    assert f"DAMAGED orders:events.jsonl:0: seq {seq}: commit record seq {seq}" in damaged.stdout
    assert "fails its digest" in damaged.stdout


def test_checkpoints_list_shows_kept_checkpoints(work: Any) -> None:
    """``checkpoints list`` prints every kept checkpoint with its positions and digest."""
    checkpointed(work)
    seq = newest_seq(work)
    listed = work.cli("checkpoints", "list", "--store", str(work.store))
    assert listed.returncode == 0, listed.stderr
    seqs = [int(s) for s in re.findall(r"orders:events\.jsonl:0 seq (\d+) epoch 1 ",
                                       listed.stdout)]
    assert seqs == list(range(max(1, seq - 9), seq + 1))


@pytest.mark.parametrize("kind", ["jsonl", "sqlite-store", "sqlite-other"])
def test_rewind_then_rerun_gives_the_exact_output(work: Any, kind: str) -> None:
    """Rewinding to a kept checkpoint moves the task back (logged); the next run repairs
    the sink and redoes the rest exactly once, even in checkpoints cut differently."""
    events = checkpointed(work, kind=kind)
    seq = newest_seq(work)
    target = seq - 3
    rewound = work.cli("checkpoints", "rewind", "--store", str(work.store),
                       "--task", "orders:events.jsonl:0", "--to", str(target))
    assert rewound.returncode == 0, rewound.stderr
    assert f"rewound to checkpoint seq {target}" in rewound.stdout
    assert f"rewound from checkpoint seq {seq} to seq {target}" in rewound.stderr
    assert newest_seq(work) == target

    events.append(500)
    # One checkpoint for all the rest: seq target + 1 now covers other records than before.
    done = work.cli(*work.run_args(work.pipeline(events, kind), "--replay-max-seconds", "3600",
                                   replay_max_events=100_000))
    assert done.returncode == 0, done.stderr
    assert f"from checkpoint seq {target}" in done.stderr
    assert newest_seq(work) == target + 1
    if kind == "jsonl":
        assert "cutting" in done.stderr
    assert work.output(kind) == work.expected(events, kind)


def test_rewind_refuses_what_it_cannot_do(work: Any) -> None:
    """Rewinding to a pruned checkpoint, to seq 0 or an unknown task fails with exit 2."""
    checkpointed(work, n=7000)
    assert newest_seq(work) > 10, "seq 1 must be pruned (10 checkpoints are kept)"
    base = ["checkpoints", "rewind", "--store", str(work.store)]
    pruned = work.cli(*base, "--task", "orders:events.jsonl:0", "--to", "1")
    assert pruned.returncode == 2
    assert "pick one listed by `resumeflow checkpoints list`" in pruned.stderr
    zero = work.cli(*base, "--task", "orders:events.jsonl:0", "--to", "0")
    assert zero.returncode == 2 and "--to must be a kept checkpoint seq" in zero.stderr
    unknown = work.cli(*base, "--task", "nope:x:0", "--to", "1")
    assert unknown.returncode == 2 and "no task 'nope:x:0'" in unknown.stderr


# -- bad configuration fails at start -----------------------------------------------------


def assert_fails_at_start(work: Any, done: subprocess.CompletedProcess[str],
                          *advice: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    text = " ".join(done.stderr.split())  # the console may wrap long messages
    for words in advice:
        assert words in text, text
    assert work.output("jsonl") == []
    assert not work.dead_letters()


def test_unknown_option_fails_at_start(work: Any) -> None:
    """An unknown option exits 2 naming it."""
    spec = work.pipeline(work.events(10))
    done = work.cli("run", spec, "--store", str(work.store), "--replay-max-event", "5")
    assert_fails_at_start(work, done, "No such option '--replay-max-event'",
                          "--replay-max-events")


@pytest.mark.parametrize(("option", "value", "advice"), [
    ("--guarantee", "exactly-twice", "Invalid value for '--guarantee'"),
    ("--replay-max-events", "0", "replay_max_events=0 must be a positive integer"),
    ("--replay-max-seconds", "-1", "replay_max_seconds=-1.0 must be a positive number"),
    ("--keep-checkpoints", "1", "keep at least 2"),
    ("--max-attempts", "0", "max_attempts=0 must be a positive integer"),
])
def test_bad_option_values_fail_at_start(work: Any, option: str, value: str,
                                         advice: str) -> None:
    """An option value that cannot work exits 2 with a message saying what to change."""
    spec = work.pipeline(work.events(10))
    done = work.cli("run", spec, "--store", str(work.store), option, value)
    assert_fails_at_start(work, done, advice)


def test_missing_input_file_fails_at_start(work: Any) -> None:
    """A flow whose input file does not exist exits 2 naming the file."""
    events = work.events(10)
    spec = work.pipeline(events)
    events.path.unlink()
    done = work.cli("run", spec, "--store", str(work.store))
    assert_fails_at_start(work, done, "configuration error", str(events.path),
                          "does not exist; check the path")


def test_unreadable_input_fails_at_start(work: Any) -> None:
    """An input path that cannot be read as a file exits 2 naming it."""
    events = work.events(10)
    spec = work.pipeline(events)
    events.path.unlink()
    events.path.mkdir()  # readable by nobody as a file (and unaffected by running as root)
    done = work.cli("run", spec, "--store", str(work.store))
    assert_fails_at_start(work, done, "configuration error", str(events.path),
                          "check the path")


def test_store_of_a_newer_schema_fails_at_start(work: Any) -> None:
    """A store written by a newer resumeflow exits 2: upgrade, or use another store."""
    events = checkpointed(work, n=100)
    work.out.unlink()
    db = sqlite3.connect(work.store)
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
               (str(SCHEMA_VERSION + 1),))
    db.commit()
    db.close()
    done = work.cli(*work.run_args(work.pipeline(events)))
    assert_fails_at_start(work, done, f"has schema version {SCHEMA_VERSION + 1}",
                          "upgrade resumeflow or use another --store path")
    status = work.cli("status", "--store", str(work.store))
    assert status.returncode == 2 and "upgrade resumeflow" in " ".join(status.stderr.split())


def test_bad_flow_spec_fails_at_start(work: Any) -> None:
    """A FILE.py:ATTR that does not name a flow exits 2 saying what is wrong."""
    spec = work.pipeline(work.events(10))
    path = spec.rpartition(":")[0]
    no_attr = work.cli("run", f"{path}:nope", "--store", str(work.store))
    assert_fails_at_start(work, no_attr, "has no attribute 'nope'")
    no_file = work.cli("run", "missing.py:flow", "--store", str(work.store))
    assert_fails_at_start(work, no_file, "'missing.py' does not exist")
    not_a_flow = work.cli("run", f"{path}:EVENTS", "--store", str(work.store))
    assert_fails_at_start(work, not_a_flow, "is a str, not a resumeflow Flow")


def test_status_of_a_missing_store_fails(work: Any) -> None:
    """``status`` on a path with no store exits 2 and creates nothing."""
    done = work.cli("status", "--store", str(work.root / "nope.db"))
    assert done.returncode == 2 and "no store at" in done.stderr
    assert not (work.root / "nope.db").exists()


# -- running ------------------------------------------------------------------------------


def test_progress_display(work: Any) -> None:
    """``--progress`` shows records, records/s, commits and the last commit's age."""
    events = work.events(3000)
    spec = work.pipeline(events, pace_every=30)  # about 1 s, so the display refreshes
    done = work.cli(*work.run_args(spec, replay_max_events=500)[:-3], "--progress")
    assert done.returncode == 0, done.stderr
    assert re.search(r"records [\d,]+\s+[\d,]+/s\s+commits \d+\s+last commit [\d.]+ s ago",
                     done.stderr), done.stderr
    assert work.output("jsonl") == events.running_totals()


@pytest.mark.slow
def test_fenced_run_exits_3(work: Any) -> None:
    """A running pipeline whose task is taken by another worker stops with exit code 3 at
    its next commit, and none of its later output lands."""
    events = work.events(2000)
    args = work.run_args(work.pipeline(events), "--follow")
    proc = subprocess.Popen(work.cli_args(*args), cwd=work.root, env=work.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr or []), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while len(work.output("jsonl")) < 2000 and time.monotonic() < deadline:
            time.sleep(0.02)
        store = rf.SQLiteStore(work.store)
        store.open_task("orders:events.jsonl:0")  # another worker takes the task
        store.close()
        events.append(500)  # the fenced run reads these but cannot commit them
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    stderr = " ".join("".join(lines).split())
    assert proc.returncode == 3, stderr
    assert "fenced: task 'orders:events.jsonl:0' is owned by epoch 2" in stderr
    assert len(work.output("jsonl")) == 2000


@pytest.mark.slow
def test_sigusr1_prints_every_threads_stack_and_the_run_goes_on(work: Any) -> None:
    """SIGUSR1 makes a running pipeline print each thread's stack to stderr without stopping
    it: a SIGTERM afterwards still ends it with exit code 0 and all of its output."""
    events = work.events(2000)
    args = work.run_args(work.pipeline(events), "--follow")
    proc = subprocess.Popen(work.cli_args(*args), cwd=work.root, env=work.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr or []), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while len(work.output("jsonl")) < 2000 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGUSR1)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    stderr = "".join(lines)
    assert proc.returncode == 0, stderr
    assert re.search(r"[Tt]hread 0x[0-9a-f]+ \(most recent call first\)", stderr), stderr
    assert "_runtime.py" in stderr, stderr
    assert work.output("jsonl") == events.running_totals()


GLOB_FLOW = '''
import resumeflow as rf

def flow():
    f = rf.Flow("glob")
    (f.source(rf.sources.JsonLinesDir("in/[ab].jsonl"))
      .key_by(lambda e: e["customer"])
      .reduce(lambda total, e: total + e["amount"], initial=0)
      .sink(rf.sinks.JsonLinesSink("out/{partition}")))
    return f
'''


def test_task_ids_and_messages_print_verbatim(work: Any) -> None:
    """Task ids and messages are printed as they are: ``[ab]`` of a glob is not taken for
    markup, ``:x:`` is not turned into an emoji (users copy task ids into ``--task``)."""
    (work.root / "in").mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        work.events(50, name=f"in/{name}")
    (work.root / "globbed.py").write_text(GLOB_FLOW)
    done = work.cli("run", "globbed.py:flow", "--store", str(work.store))
    assert done.returncode == 0, done.stderr
    assert "recovered task glob:in/[ab].jsonl:a.jsonl" in done.stderr

    table = work.cli("status", "--store", str(work.store))
    assert "glob:in/[ab].jsonl:a.jsonl" in table.stdout, table.stdout
    verify = work.cli("checkpoints", "verify", "--store", str(work.store))
    assert "ok glob:in/[ab].jsonl:b.jsonl: 1 checkpoint(s) verify" in verify.stdout
    listed = work.cli("checkpoints", "list", "--store", str(work.store))
    assert "glob:in/[ab].jsonl:a.jsonl seq 1 epoch 1" in listed.stdout
    rewind = work.cli("checkpoints", "rewind", "--store", str(work.store), "--task",
                      "nope:x:0", "--to", "1")
    assert rewind.returncode == 2
    assert "no task 'nope:x:0' in this store" in rewind.stderr


# -- a PostgreSQL store -------------------------------------------------------------------


def test_inspection_commands_read_a_postgresql_store_and_never_print_its_password(
        work: Any, postgres_dsn: str) -> None:
    """``status``, ``checkpoints list|verify|rewind`` take a PostgreSQL DSN and hide its
    password."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    from resumeflow.checkpoint import PostgresStore

    events = work.events(2000, customers=7)
    flow = rf.Flow("orders")
    (flow.source(rf.sources.JsonLines(events.path))
         .key_by(lambda e: e["customer"])
         .reduce(lambda total, e: total + e["amount"], initial=0)
         .sink(rf.sinks.JsonLinesSink(work.out)))
    store = PostgresStore(postgres_dsn)
    rf.run(flow, store, rf.RunConfig(replay_max_events=300,
                                     dead_letter_path=str(work.root / "dead.jsonl")))
    store.close()
    # the test server trusts local connections, so a password in the DSN is accepted unused
    dsn = make_conninfo(**{**conninfo_to_dict(postgres_dsn), "password": "s3cr3t-pw"})

    as_json = work.cli("status", "--store", dsn, "--json")
    assert as_json.returncode == 0, as_json.stderr
    (task,) = json.loads(as_json.stdout)
    assert task["task"] == "orders:events.jsonl:0"
    assert task["positions"] == {"0": events.size} and task["state_keys"] == 7
    seq = task["seq"]
    assert seq >= 6

    table = work.cli("status", "--store", dsn)
    listed = work.cli("checkpoints", "list", "--store", dsn)
    verified = work.cli("checkpoints", "verify", "--store", dsn)
    for done in (table, listed, verified):
        assert done.returncode == 0, done.stderr
        assert "s3cr3t-pw" not in done.stdout + done.stderr
    assert "orders:events.jsonl:0" in table.stdout
    assert f"orders:events.jsonl:0 seq {seq} " in listed.stdout
    assert "ok orders:events.jsonl:0" in verified.stdout

    rewound = work.cli("checkpoints", "rewind", "--store", dsn, "--task",
                       "orders:events.jsonl:0", "--to", str(seq - 2))
    assert rewound.returncode == 0, rewound.stderr
    after = work.cli("status", "--store", dsn, "--json")
    assert json.loads(after.stdout)[0]["seq"] == seq - 2
