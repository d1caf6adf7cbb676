"""Runtime under a shared membership: tasks open on gain, commit and close on loss, and a
fenced task is dropped, with each record's effect landing exactly once.

The membership here is a fake driven by the test (``Group``); the store is a real SQLite
file shared by runtimes in threads, each with its own store object, as worker processes are.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

import resumeflow as rf
from resumeflow.errors import ConfigurationError
from resumeflow.runtime import ReleaseHandler, StaticMembership, ThrottledMembership
from resumeflow.runtime import _runtime as runtime_module

PARTITIONS = ("p0.jsonl", "p1.jsonl", "p2.jsonl", "p3.jsonl")
FOLLOW = rf.RunConfig(follow=True, replay_max_events=500, replay_max_seconds=0.05,
                      poll_interval_s=0.005, batch_max_records=50)


class Group:
    """Partitions handed out by the test; each member sees changes at its next poll."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.owners: dict[str, set[str]] = {}

    def member(self, name: str) -> Member:
        return Member(self, name)

    def give(self, partitions: Sequence[str], name: str, *, only: bool = True) -> None:
        """Make ``name`` own ``partitions`` (alone, unless ``only`` is false: a zombie)."""
        with self.lock:
            for p in partitions:
                owners = self.owners.setdefault(p, set())
                if only:
                    owners.clear()
                owners.add(name)


class Member:
    """A fake membership: holds what the group says, reports the difference on poll."""

    def __init__(self, group: Group, name: str) -> None:
        self.group = group
        self.name = name
        self.held: set[str] = set()
        self.polls = 0
        self.left = False

    def join(self, partitions: Sequence[str]) -> None:
        with self.group.lock:
            for p in partitions:
                self.group.owners.setdefault(p, set())

    def poll(self) -> tuple[list[str], list[str]]:
        self.polls += 1
        with self.group.lock:
            want = {p for p, owners in self.group.owners.items() if self.name in owners}
        gained, lost = sorted(want - self.held), sorted(self.held - want)
        self.held = want
        return gained, lost

    def leave(self) -> None:
        self.left = True
        with self.group.lock:
            for owners in self.group.owners.values():
                owners.discard(self.name)
        self.held = set()


class HandingMember(Member):
    """A member that lets a partition go only after the runtime's release handler ran."""

    def __init__(self, group: Group, name: str, seen: Callable[[list[str]], None]) -> None:
        super().__init__(group, name)
        self.handler: ReleaseHandler | None = None
        self.seen = seen

    def on_release(self, handler: ReleaseHandler) -> None:
        self.handler = handler

    def poll(self) -> tuple[list[str], list[str]]:
        with self.group.lock:
            want = {p for p, owners in self.group.owners.items() if self.name in owners}
        going = sorted(self.held - want)
        if going and self.handler is not None:
            self.handler(going)
            self.seen(going)
        return super().poll()


def write_inputs(root: Path, per_partition: int) -> dict[str, list[dict[str, Any]]]:
    events: dict[str, list[dict[str, Any]]] = {}
    for n, name in enumerate(PARTITIONS):
        rows = [{"id": i, "k": f"k{(i * 7 + n) % 5}", "v": i % 13 + 1}
                for i in range(per_partition)]
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        events[name] = rows
    return events


def expected(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    sums: dict[str, int] = {}
    out = []
    for r in rows:
        sums[r["k"]] = sums.get(r["k"], 0) + r["v"]
        out.append({"id": r["id"], "sum": sums[r["k"]]})
    return out


def make_flow(root: Path) -> rf.Flow:
    flow = rf.Flow("group")
    (flow.source(rf.sources.JsonLinesDir(str(root / "p*.jsonl"), name="files"))
         .key_by(lambda e: e["k"])
         .stateful_map(lambda s, e: (s + e["v"], {"id": e["id"], "sum": s + e["v"]}),
                       initial=0)
         .sink(rf.sinks.JsonLinesSink(root / "out-{partition}.jsonl", with_key=False)))
    return flow


def output(root: Path, partition: str) -> list[Any]:
    path = root / f"out-{partition}.jsonl"
    return [json.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


def lines_so_far(root: Path, partition: str) -> int:
    """Complete lines in a partition's output while a worker may be appending to it: a poll can
    catch the last line half-written, so only lines ending in a newline count."""
    path = root / f"out-{partition}.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


class Worker:
    """A runtime running in a thread until stopped."""

    def __init__(self, root: Path, membership: Any, config: rf.RunConfig = FOLLOW) -> None:
        self.runtime = rf.Runtime(make_flow(root), root / "store.db", config,
                                  membership=membership)
        self.summary: rf.RunSummary | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.summary = self.runtime.run()
        except BaseException as exc:
            self.error = exc

    def stop(self) -> rf.RunSummary:
        self.runtime.stop("test")
        self.thread.join(30)
        assert not self.thread.is_alive(), "the worker did not stop"
        if self.error is not None:
            raise self.error
        assert self.summary is not None
        return self.summary


def wait_for(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def committed(root: Path) -> dict[str, tuple[int, int, Any]]:
    """Per partition: (seq, epoch, committed position)."""
    store = rf.SQLiteStore(root / "store.db", create=False)
    try:
        out = {}
        for t in store.tasks():
            partition = t.task.rsplit(":", 1)[1]
            r = t.record
            out[partition] = (r.seq if r else 0, t.epoch,
                              r.positions.get(partition) if r else None)
        return out
    finally:
        store.close()


def test_static_membership_gives_every_partition_once() -> None:
    """StaticMembership reports every partition gained at its first poll and nothing after."""
    m = StaticMembership()
    m.join(["0", "1", "2"])
    assert m.poll() == (["0", "1", "2"], [])
    assert m.poll() == ([], [])
    m.leave()


def test_shared_membership_without_follow_is_refused_at_start(tmp_path: Path) -> None:
    """A runtime on a shared membership must follow its inputs, and says how to fix it."""
    write_inputs(tmp_path, 3)
    with pytest.raises(ConfigurationError, match="follow=True"):
        rf.Runtime(make_flow(tmp_path), tmp_path / "store.db", rf.RunConfig(),
                   membership=Group().member("a"))


def test_partitions_moving_between_workers_land_every_record_once(tmp_path: Path) -> None:
    """Partitions moved from one worker to another mid-run are committed by the first, resumed
    by the second from that commit, and the output is exactly the reference."""
    events = write_inputs(tmp_path, 3000)
    group = Group()
    group.give(PARTITIONS, "a")
    a = Worker(tmp_path, group.member("a"))
    b = Worker(tmp_path, group.member("b"))
    wait_for(lambda: all(lines_so_far(tmp_path, p) >= 300 for p in PARTITIONS))
    group.give(PARTITIONS[2:], "nobody")
    wait_for(lambda: len(a.runtime.tasks) == 2)
    group.give(PARTITIONS[2:], "b")
    wait_for(lambda: all(lines_so_far(tmp_path, p) == 3000 for p in PARTITIONS))
    sa, sb = a.stop(), b.stop()
    for p in PARTITIONS:
        assert output(tmp_path, p) == expected(events[p]), p
    assert (sa.tasks_gained, sa.tasks_released, sb.tasks_gained) == (4, 2, 2)
    assert sa.rebalances == 2 and sb.rebalances == 1
    assert sa.fenced == sb.fenced == 0
    assert sb.records_in > 0 and sb.records_replayed == 0
    epochs = {p: epoch for p, (_, epoch, _) in committed(tmp_path).items()}
    assert epochs == {"p0.jsonl": 1, "p1.jsonl": 1, "p2.jsonl": 2, "p3.jsonl": 2}


def test_a_lost_task_commits_before_closing_so_the_next_owner_replays_nothing(
        tmp_path: Path) -> None:
    """Losing a partition commits its uncommitted records; the next owner resumes right at
    that commit and re-reads none of them."""
    events = write_inputs(tmp_path, 2000)
    group = Group()
    group.give(PARTITIONS, "a")
    slow = rf.RunConfig(follow=True, replay_max_events=100_000, replay_max_seconds=3600,
                        poll_interval_s=0.005, batch_max_records=10)
    a = Worker(tmp_path, group.member("a"), slow)
    wait_for(lambda: sum(t.window_events for t in list(a.runtime.tasks)) >= 100)
    b = Worker(tmp_path, group.member("b"), slow)
    group.give(PARTITIONS, "nobody")
    wait_for(lambda: not a.runtime.tasks)
    handed = committed(tmp_path)
    group.give(PARTITIONS, "b")
    sizes = {p: (tmp_path / p).stat().st_size for p in PARTITIONS}
    wait_for(lambda: len(b.runtime.tasks) == 4 and all(
        t.positions.get(t.partition) == sizes[t.partition] for t in list(b.runtime.tasks)))
    sa = a.stop()
    sb = b.stop()  # its one commit per task: on stop
    for p in PARTITIONS:
        assert output(tmp_path, p) == expected(events[p]), p
    assert sa.commits == 4, "each lost task commits exactly once, at its release"
    assert sa.records_in > 0 and sa.fenced == 0
    assert all(handed[p][0] == 1 for p in PARTITIONS)
    assert sb.records_replayed == 0
    assert [r.seq for r in sb.recoveries] == [1, 1, 1, 1]
    assert [r.positions for r in sb.recoveries] == [
        {p: handed[p][2]} for p in PARTITIONS]


def test_a_fenced_task_is_dropped_and_counted_and_lands_nothing(tmp_path: Path) -> None:
    """When another worker takes a task the first still runs (a zombie), the first worker's
    commit is refused, it drops the task and counts it, and the output stays exact."""
    events = write_inputs(tmp_path, 2000)
    group = Group()
    group.give(PARTITIONS[:1], "a")
    zombie = rf.Runtime(make_flow(tmp_path), tmp_path / "store.db", FOLLOW,
                        membership=group.member("a"))
    (recovery,) = zombie.open()
    (task,) = zombie.tasks
    assert task.step() > 0
    group.give(PARTITIONS, "b", only=False)
    b = Worker(tmp_path, group.member("b"))
    wait_for(lambda: lines_so_far(tmp_path, PARTITIONS[0]) == 2000)
    result: list[rf.RunSummary] = []
    thread = threading.Thread(target=lambda: result.append(zombie.run()), daemon=True)
    thread.start()
    wait_for(lambda: not zombie.tasks)
    zombie.stop("test")
    thread.join(30)
    b.stop()
    (summary,) = result
    assert summary.fenced == 1 and summary.commits == 0
    for p in PARTITIONS:
        assert output(tmp_path, p) == expected(events[p]), p
    assert committed(tmp_path)[PARTITIONS[0]][1] == recovery.epoch + 1


def test_a_task_fenced_by_a_zombie_is_taken_again_while_the_membership_gives_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that restarts a task after it lost the partition (a zombie) fences the owner;
    once the zombie lets the partition go, the owner, which the membership still gives it,
    takes the task again and runs it to the end: nothing is left unprocessed, and every
    record lands once."""
    monkeypatch.setattr(runtime_module, "FENCED_RETAKE_S", (0.2, 1.0))
    events = write_inputs(tmp_path, 2000)
    group = Group()
    group.give(PARTITIONS, "a")
    slow = rf.RunConfig(follow=True, replay_max_events=200, replay_max_seconds=0.05,
                        poll_interval_s=0.005, batch_max_records=10)
    a = Worker(tmp_path, group.member("a"), slow)
    wait_for(lambda: 0 < lines_so_far(tmp_path, PARTITIONS[0]) < 1000)
    group.give(PARTITIONS[:1], "zombie", only=False)
    zombie = rf.Runtime(make_flow(tmp_path), tmp_path / "store.db", slow,
                        membership=group.member("zombie"))
    (recovery,) = zombie.open()  # a new epoch: the owner's next commit is refused
    group.give(PARTITIONS[:1], "a")  # the zombie hears it lost the partition
    result: list[rf.RunSummary] = []
    thread = threading.Thread(target=lambda: result.append(zombie.run()), daemon=True)
    thread.start()
    wait_for(lambda: all(lines_so_far(tmp_path, p) == 2000 for p in PARTITIONS), 60)
    zombie.stop("test")
    thread.join(30)
    summary = a.stop()
    assert summary.fenced >= 1
    for p in PARTITIONS:
        assert output(tmp_path, p) == expected(events[p]), p
    assert committed(tmp_path)[PARTITIONS[0]][1] > recovery.epoch


def test_a_handing_over_membership_releases_after_the_commit(tmp_path: Path) -> None:
    """A membership with a release handler lets a partition go only once its task has
    committed its records and closed."""
    write_inputs(tmp_path, 1000)
    group = Group()
    group.give(PARTITIONS, "a")
    at_release: dict[str, tuple[int, int, Any]] = {}
    slow = rf.RunConfig(follow=True, replay_max_events=100_000, replay_max_seconds=3600,
                        poll_interval_s=0.005, batch_max_records=10)

    def seen(partitions: list[str]) -> None:
        snapshot = committed(tmp_path)
        for p in partitions:
            at_release[p] = snapshot[p]

    member = HandingMember(group, "a", seen)
    a = Worker(tmp_path, member, slow)
    wait_for(lambda: sum(t.window_events for t in list(a.runtime.tasks)) >= 100)
    group.give(PARTITIONS[:2], "nobody")
    wait_for(lambda: len(a.runtime.tasks) == 2)
    summary = a.stop()
    assert sorted(at_release) == list(PARTITIONS[:2])
    assert all(seq == 1 for seq, _, _ in at_release.values())
    assert summary.tasks_released == 2 and member.left


def test_a_worker_holding_nothing_runs_until_stopped(tmp_path: Path) -> None:
    """A follower that holds no partition keeps polling its membership instead of ending."""
    write_inputs(tmp_path, 3)
    member = Group().member("idle")
    w = Worker(tmp_path, member)
    wait_for(lambda: member.polls > 20)
    assert w.thread.is_alive()
    summary = w.stop()
    assert summary.records_in == 0 and summary.stopped_by == "test" and member.left


def test_throttled_membership_polls_its_inner_one_at_most_once_per_interval() -> None:
    """ThrottledMembership asks its inner membership at most once per interval and reports
    no change in between, so a database-backed membership is not polled every loop turn."""
    now = [0.0]
    inner = Group().member("a")
    inner.group.give(["0"], "a")
    m = ThrottledMembership(inner, 1.0, clock=lambda: now[0])
    m.join(["0", "1"])
    assert m.poll() == (["0"], [])
    inner.group.give(["1"], "a", only=False)
    now[0] = 0.5
    assert m.poll() == ([], []) and inner.polls == 1
    now[0] = 1.0
    assert m.poll() == (["1"], []) and inner.polls == 2
    m.leave()
    assert inner.left
