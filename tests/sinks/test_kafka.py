"""KafkaSink against a real broker: the sink contract, crashes at every commit step, fencing of
an old owner, and a broker restart between the commit point and finalize."""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from resumeflow import SQLiteStore
from resumeflow._faults import CRASH_POINTS, installed
from resumeflow.checkpoint import Store, make_record
from resumeflow.errors import ConfigurationError, FencedError, UnavailableError
from resumeflow.sinks import KafkaSink, SinkContext
from resumeflow.testing import MemoryStore, SimulatedCrash, SinkFixture, check_sink

pytestmark = pytest.mark.slow

_names = itertools.count()


@pytest.fixture
def topic(kafka: Any) -> Callable[..., str]:
    """Makes a fresh topic on the session broker; returns its name."""
    from resumeflow.testing._kafka_broker import create_topic

    def make(partitions: int = 1) -> str:
        name = f"sink-{next(_names)}"
        create_topic(kafka.bootstrap, name, partitions)
        return name
    return make


def _read(kafka: Any, name: str, *, keyed: bool = True) -> list[Any]:
    from resumeflow.testing._kafka_broker import read_topic

    msgs = read_topic(kafka.bootstrap, name)
    return [[m.key, m.value] for m in msgs] if keyed else [m.value for m in msgs]


def _sink(kafka: Any, name: str, **kw: Any) -> KafkaSink:
    kw.setdefault("op_timeout_s", 5.0)
    kw.setdefault("retry_backoff_base_s", 0.05)
    kw.setdefault("retry_backoff_max_s", 0.5)
    return KafkaSink(name, bootstrap=kafka.bootstrap, **kw)


# -- the contract -------------------------------------------------------------------------


@pytest.mark.parametrize(("guarantee", "keyed"), [
    ("exactly-once", True), ("exactly-once", False), ("at-least-once", True)])
def test_kafka_sink_passes_check_sink(kafka: Any, topic: Callable[..., str], guarantee: Any,
                                      keyed: bool) -> None:
    """KafkaSink keeps the sink contract, read back with read_committed."""
    def make() -> SinkFixture:
        name = topic()
        return SinkFixture(sink=_sink(kafka, name), read=lambda: _read(kafka, name, keyed=keyed),
                           keyed=keyed, guarantee=guarantee)
    check_sink(make)


def test_open_fails_on_a_missing_topic(kafka: Any) -> None:
    """Opening a sink on a topic that does not exist fails with a ConfigurationError naming
    it."""
    with pytest.raises(ConfigurationError, match=r"no-such-topic.*does not exist"):
        _sink(kafka, "no-such-topic").open(_ctx())


def test_open_fails_on_an_unreachable_cluster(caplog: pytest.LogCaptureFixture) -> None:
    """A sink whose bootstrap answers nothing fails at open, without logging its password."""
    from resumeflow.testing._kafka_broker import _free_port

    sink = KafkaSink("t", bootstrap=f"127.0.0.1:{_free_port()}", connect_timeout_s=2,
                     config={"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "PLAIN",
                             "sasl.username": "u", "sasl.password": "hunter2-secret"})
    with caplog.at_level(logging.DEBUG), pytest.raises(ConfigurationError) as info:
        sink.open(_ctx())
    assert "cannot reach Kafka" in str(info.value)
    assert "hunter2" not in str(info.value) + caplog.text + repr(sink)


def test_config_may_not_override_what_the_sink_manages() -> None:
    """A config that sets the transactional id is refused at construction."""
    with pytest.raises(ConfigurationError, match=r"transactional\.id"):
        KafkaSink("t", bootstrap="127.0.0.1:1", config={"transactional.id": "x"})


# -- crashes and owners, by hand ------------------------------------------------------------

_TASK = "orders:src:0"


def _ctx(*, epoch: int = 0, keyed: bool = True) -> SinkContext:
    return SinkContext(sink_id="out", task=_TASK, partition="0", partitions=1, keyed=keyed,
                       guarantee="exactly-once", store_path=None, epoch=epoch)


class _Owner:
    """One owner of the task: opens it in the store, recovers a writer, runs checkpoints."""

    def __init__(self, sink: KafkaSink, store: Store) -> None:
        self.store = store
        self.opened = store.open_task(_TASK)
        rec = self.opened.record
        self.seq = rec.seq if rec else 0
        self.digest = rec.digest if rec else None
        self.writer = sink.open(_ctx(epoch=self.opened.epoch))
        self.writer.recover(rec.sink_txn.get("out") if rec else None,
                            [e for e in self.opened.staged if e.sink == "out"])

    def commit(self, items: list[Any]) -> int:
        """Pre-commit and commit the store (the commit point), without finalize."""
        from resumeflow.checkpoint import GENESIS_DIGEST

        seq = self.seq + 1
        self.writer.buffer.extend(items)
        pre = self.writer.precommit(seq)
        record = make_record(task=_TASK, epoch=self.opened.epoch, seq=seq, positions={"0": seq},
                             sink_txn={"out": pre.meta}, inflight=[], created_at=0.0, stats={},
                             prev_digest=self.digest or GENESIS_DIGEST)
        done = self.writer.releasable()
        self.store.commit(self.opened, record, [], [pre.staged] if pre.staged else [],
                          [("out", done)] if done is not None else [])
        self.seq, self.digest = seq, record.digest
        return seq


def _batch(seq: int, n: int = 5) -> list[Any]:
    return [(f"k{i % 3}", {"seq": seq, "i": i}) for i in range(n)]


def _raise_at(point: str) -> Callable[[str], None]:
    def hook(name: str) -> None:
        if name == point:
            raise SimulatedCrash(point)
    return hook


@pytest.fixture
def store(tmp_path: Any) -> Iterator[Store]:
    """A SQLite store in a scratch directory."""
    s = SQLiteStore(tmp_path / "store.db")
    yield s
    s.close()


@pytest.mark.parametrize("point", CRASH_POINTS[1:])
def test_crash_at_each_point_then_recover_publishes_each_seq_once_in_order(
        kafka: Any, topic: Callable[..., str], store: Store, point: str) -> None:
    """A crash at any commit-protocol crash point, then recovery, leaves every committed
    checkpoint in the read_committed output exactly once and in order."""
    name = topic()
    sink = _sink(kafka, name)
    owner = _Owner(sink, store)
    for _ in range(2):
        seq = owner.commit(_batch(owner.seq + 1))
        owner.writer.finalize(seq)
    committed = 2
    with installed(_raise_at(point)), contextlib.suppress(SimulatedCrash):
        if point in ("commit.before_precommit",):
            _crash_hook(point)
        else:
            seq = owner.seq + 1
            if point == "commit.after_precommit":
                owner.writer.buffer.extend(_batch(seq))
                owner.writer.precommit(seq)
                _crash_hook(point)
            else:
                owner.commit(_batch(seq))
                committed = seq
                if point in ("store.before_commit", "commit.after_store"):
                    _crash_hook(point)
                owner.writer.finalize(seq)  # crashes half-way at sink.finalize.partial
                _crash_hook(point)
    owner = _Owner(sink, store)  # the old writer is dropped without close, as by a crash
    owner.writer.finalize(owner.commit(_batch(owner.seq + 1)))
    expected = [[k, v] for s in (*range(1, committed + 1), committed + 1) for k, v in _batch(s)]
    got = _read(kafka, name)
    assert sorted(got, key=_order) == expected
    assert len(got) == len(expected)
    owner.writer.close()


def _crash_hook(point: str) -> None:
    from resumeflow._faults import crash_point

    crash_point(point)


def _order(item: list[Any]) -> tuple[int, int]:
    return item[1]["seq"], item[1]["i"]


def test_order_within_a_key_follows_the_checkpoints(kafka: Any, topic: Callable[..., str],
                                                    store: Store) -> None:
    """Per partition, records republished by recovery come in checkpoint order after what was
    published before."""
    name = topic(3)
    owner = _Owner(_sink(kafka, name), store)
    owner.writer.finalize(owner.commit(_batch(1, 9)))
    owner.commit(_batch(2, 9))
    owner.commit(_batch(3, 9))  # neither finalized: a crash
    again = _Owner(_sink(kafka, name), store)
    from resumeflow.testing._kafka_broker import read_topic

    msgs = read_topic(kafka.bootstrap, name)
    for part in {m.partition for m in msgs}:
        values = [m.value for m in msgs if m.partition == part]
        assert values == sorted(values, key=lambda v: (v["seq"], v["i"]))
    assert len(msgs) == 27
    again.writer.close()


def test_new_owner_fences_the_old_one(kafka: Any, topic: Callable[..., str]) -> None:
    """The new owner's recovery fences the old owner's producer: the old one's later finalize
    raises FencedError and adds nothing."""
    name = topic()
    store = MemoryStore()
    old = _Owner(_sink(kafka, name), store)
    old.writer.finalize(old.commit(_batch(1)))
    seq = old.commit(_batch(2))
    new = _Owner(_sink(kafka, name), store)  # bumps the epoch, republishes seq 2
    with pytest.raises(FencedError):
        old.writer.finalize(seq)
    with pytest.raises(FencedError):
        old.writer.finalize(seq)
    new.writer.finalize(new.commit(_batch(3)))
    want = [[k, v] for s in (1, 2, 3) for k, v in _batch(s)]
    assert sorted(_read(kafka, name), key=_order) == want
    new.writer.close()


@pytest.mark.parametrize("budget_s", [60.0, 0.5])
def test_broker_restart_between_commit_and_finalize(kafka: Any, topic: Callable[..., str],
                                                    store: Store, budget_s: float) -> None:
    """With the broker down after the commit point, finalize retries until it is back (or,
    its retry budget spent, the task restarts), and the output holds each checkpoint once."""
    import threading

    name = topic()
    sink = _sink(kafka, name, retry_budget_s=budget_s, retry_max_attempts=100, op_timeout_s=3)
    owner = _Owner(sink, store)
    owner.writer.finalize(owner.commit(_batch(1)))
    seq = owner.commit(_batch(2))
    kafka.stop()
    restart = threading.Timer(2.0, kafka.start)
    restart.start()
    restarted = False
    try:
        owner.writer.finalize(seq)
        assert budget_s > 2, "finalize returned while the broker was still down"
    except UnavailableError:  # budget spent, or the client stopped answering: task restarts
        restart.join()
        owner = _Owner(sink, store)
        restarted = True
    restart.join()
    assert restarted or sink.retries > 0
    assert restarted or budget_s > 2
    owner.writer.finalize(owner.commit(_batch(3)))
    want = [[k, v] for s in (1, 2, 3) for k, v in _batch(s)]
    assert sorted(_read(kafka, name), key=_order) == want
    owner.writer.close()


# -- end to end: the example flow, SIGKILLed, resumed --------------------------------------

_PIPELINE = '''\
"""Example flow into Kafka, written by the test suite."""
import resumeflow as rf


def flow():
    f = rf.Flow("orders")
    (f.source(rf.sources.JsonLines({events!r}))
      .key_by(lambda e: e["customer"])
      .reduce(lambda total, e: total + e["amount"], initial=0)
      .sink(rf.sinks.KafkaSink({topic!r}, bootstrap={bootstrap!r})))
    return f
'''


@pytest.mark.parametrize("crash_at", ["commit.after_precommit:3", "commit.after_store:3",
                                      "sink.finalize.partial:2", "batch.mid:5"])
def test_example_flow_killed_and_resumed_is_exactly_once(
        kafka: Any, topic: Callable[..., str], work: Any, crash_at: str) -> None:
    """The example flow from a JSON-lines file into KafkaSink on SQLiteStore, SIGKILLed at a
    commit step and resumed, leaves every running total in the topic exactly once, in order."""
    import signal

    events = work.events(3000, seed=1)
    name = topic()
    spec = work.root / "pipeline.py"
    spec.write_text(_PIPELINE.format(events=str(events.path), topic=name,
                                     bootstrap=kafka.bootstrap))
    args = work.run_args(f"{spec}:flow", replay_max_events=500)
    killed = work.cli(*args, crash_at=crash_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    done = work.cli(*args)
    assert done.returncode == 0, done.stderr
    assert _read(kafka, name) == [[e["key"], e["value"]] for e in events.running_totals()]
