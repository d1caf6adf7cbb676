"""KafkaSource against a real broker: the source contract (transaction markers and aborted
records leave gaps in the offsets), bounded runs, dead-lettered malformed records, advisory
broker offsets, configuration errors and retries when no broker answers."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

import resumeflow as rf
from resumeflow.errors import BadRecordError, ConfigurationError, DataError, UnavailableError
from resumeflow.runtime import StaticMembership
from resumeflow.testing import check_source


def _topic(kafka: Any, partitions: int) -> str:
    from resumeflow.testing._kafka_broker import create_topic

    name = f"src-{uuid.uuid4().hex[:8]}"
    create_topic(kafka.bootstrap, name, partitions)
    return name


def _produce(kafka: Any, topic: str, partition: int, values: list[bytes], *,
             transactions: list[tuple[int, bool]] | None = None) -> None:
    """Produce ``values`` to one partition; with ``transactions``, in transactions of the
    given sizes, each committed (True) or aborted (False)."""
    from confluent_kafka import Producer

    conf: dict[str, Any] = {"bootstrap.servers": kafka.bootstrap, "enable.idempotence": True}
    if transactions:
        conf["transactional.id"] = f"test-{uuid.uuid4().hex}"
    producer = Producer(conf)
    if not transactions:
        for v in values:
            producer.produce(topic, value=v, partition=partition)
        assert producer.flush(30) == 0
        return
    producer.init_transactions(30)
    it = iter(values)
    for size, commit in transactions:
        producer.begin_transaction()
        for _ in range(size):
            producer.produce(topic, value=next(it), partition=partition)
        assert producer.flush(30) == 0  # written to the log, so an abort leaves a gap
        if commit:
            producer.commit_transaction(30)
        else:
            producer.abort_transaction(30)


def _gappy_topic(kafka: Any) -> str:
    """Partition 0: committed, aborted and committed transactions (offsets 0-2, 8-10 visible);
    partition 1: plain records; partition 2: empty."""
    topic = _topic(kafka, 3)
    values = [json.dumps({"n": i}).encode() for i in range(9)]
    _produce(kafka, topic, 0, values, transactions=[(3, True), (3, False), (3, True)])
    _produce(kafka, topic, 1, [json.dumps({"n": 100 + i}).encode() for i in range(5)])
    return topic


def _source(kafka: Any, topic: str, **kwargs: Any) -> Any:
    return rf.sources.KafkaSource(topic, bootstrap=kafka.bootstrap, group_id=f"g-{topic}",
                                  **kwargs)


@pytest.mark.slow
def test_kafka_source_passes_check_source_with_transaction_gaps(kafka: Any) -> None:
    """KafkaSource keeps the source contract on committed, aborted and plain records and an
    empty partition, resuming at any reported offset across the gaps markers leave."""
    topic = _gappy_topic(kafka)
    check_source(lambda: _source(kafka, topic))


def test_read_committed_skips_aborted_records_and_positions_follow_offsets(kafka: Any) -> None:
    """Only committed records are read, each at its own offset, and the position after the
    last one is its offset + 1."""
    topic = _gappy_topic(kafka)
    source = _source(kafka, topic)
    assert source.partitions() == ["0", "1", "2"]
    reader = source.open("0", None, follow=False)
    seen: list[tuple[int, Any]] = []
    while not reader.at_end:
        batch = reader.read(100)
        if batch is not None:
            seen.extend((batch.locate(i), source.decode(raw))
                        for i, raw in enumerate(batch.items))
    reader.close()
    assert seen == [(0, {"n": 0}), (1, {"n": 1}), (2, {"n": 2}),
                    (8, {"n": 6}), (9, {"n": 7}), (10, {"n": 8})]
    assert reader.position == 11


def _flow(kafka: Any, topic: str, out: Path) -> rf.Flow:
    flow = rf.Flow("ksum")
    (flow.source(_source(kafka, topic))
         .key_by(lambda e: e["n"] % 2)
         .reduce(lambda total, e: total + e["n"], initial=0)
         .sink(rf.sinks.JsonLinesSink(out, with_key=True)))
    return flow


def test_bounded_run_commits_offsets_and_advises_the_broker(kafka: Any, tmp_path: Path) -> None:
    """A run over every partition (StaticMembership) ends at the topic's end, its commit
    records hold offset + 1 of each last record, and the broker has them as advice by the time
    the run returns."""
    from confluent_kafka import Consumer, TopicPartition

    topic = _gappy_topic(kafka)
    out = tmp_path / "out-{partition}.jsonl"
    summary = rf.Runtime(_flow(kafka, topic, out), tmp_path / "s.db", rf.RunConfig(),
                         membership=StaticMembership()).run()
    assert summary.records_in == 11
    lines = {p: (tmp_path / f"out-{p}.jsonl").read_text().splitlines() for p in "01"}
    assert [json.loads(x)["value"] for x in lines["0"]] == [0, 1, 2, 8, 8, 16]
    assert len(lines["1"]) == 5 and not (tmp_path / "out-2.jsonl").read_text()
    store = rf.SQLiteStore(tmp_path / "s.db", create=False)
    positions = {t.task.rsplit(":", 1)[1]: t.record.positions for t in store.tasks()
                 if t.record is not None}
    store.close()
    assert positions == {"0": {"0": 11}, "1": {"1": 5}}
    probe = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": f"g-{topic}"})
    # The run waits for the broker to acknowledge its last advice before it returns; the
    # probe's own lookup may still meet a coordinator that is loading (a per-partition error,
    # offset -1001), so it asks again for a while.
    deadline = time.monotonic() + 30
    try:
        while True:
            committed = probe.committed([TopicPartition(topic, p) for p in (0, 1)], timeout=10)
            if [tp.offset for tp in committed] == [11, 5] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        probe.close()
    assert [tp.offset for tp in committed] == [11, 5]


def test_malformed_record_is_dead_lettered_naming_topic_partition_offset(
        kafka: Any, tmp_path: Path) -> None:
    """A record that is not JSON fails to decode with an error naming topic, partition and
    offset, goes to the dead letters, and the records around it are processed."""
    topic = _topic(kafka, 1)
    _produce(kafka, topic, 0, [b'{"n": 1}', b'{"n": oops', b'{"n": 3}'])
    source = _source(kafka, topic)
    reader = source.open("0", 1, follow=False)
    batch = None
    while batch is None:
        batch = reader.read(1)
    with pytest.raises(BadRecordError, match=rf"topic {topic}.*partition '0', position 1"):
        source.decode(batch.items[0])
    reader.close()

    out = tmp_path / "out.jsonl"
    rf.Runtime(_flow(kafka, topic, out), tmp_path / "s.db", rf.RunConfig(),
               membership=StaticMembership()).run()
    assert [json.loads(x)["value"] for x in out.read_text().splitlines()] == [1, 4]
    (dead,) = [json.loads(x) for x in
               (tmp_path / "s.db.deadletters" / "0.jsonl").read_text().splitlines()]
    assert (dead["partition"], dead["position"], dead["kind"]) == ("0", 1, "bad-record")
    assert f"topic {topic}" in dead["error"] and '{"n": oops' in dead["record"]


def test_missing_topic_fails_at_start(kafka: Any) -> None:
    """A topic that does not exist is refused when the pipeline starts, saying to create it."""
    with pytest.raises(ConfigurationError, match=r"does not exist.*create it"):
        _source(kafka, f"missing-{uuid.uuid4().hex[:6]}").partitions()


@pytest.mark.parametrize("bad", [{"enable.auto.commit": True},
                                 {"isolation.level": "read_uncommitted"},
                                 {"partition.assignment.strategy": "range"},
                                 {"group.id": "other"}])
def test_settings_that_break_the_guarantees_are_refused(bad: dict[str, Any]) -> None:
    """A consumer setting that would break the source's guarantees is refused at once."""
    with pytest.raises(ConfigurationError, match=r"remove it|as an argument"):
        rf.sources.KafkaSource("t", bootstrap="127.0.0.1:1", group_id="g", config=bad)


def test_group_membership_needs_follow(tmp_path: Path) -> None:
    """A flow on a KafkaSource joins its consumer group, so a run that does not follow is
    refused before anything connects, saying how to read every partition instead."""
    flow = rf.Flow("f")
    (flow.source(rf.sources.KafkaSource("t", bootstrap="127.0.0.1:1", group_id="g"))
         .sink(rf.sinks.Stdout()))
    with pytest.raises(ConfigurationError, match="StaticMembership"):
        rf.Runtime(flow, tmp_path / "s.db", rf.RunConfig())


def test_unreachable_brokers_are_retried_then_unavailable() -> None:
    """With no broker listening, metadata calls are retried with backoff within the budget,
    counted, and then fail with UnavailableError naming the bootstrap address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    source = rf.sources.KafkaSource("t", bootstrap=f"127.0.0.1:{port}", group_id="g",
                                    timeout_s=0.5, retry_budget=2, retry_backoff_base_s=0.01,
                                    retry_backoff_max_s=0.02)
    with pytest.raises(UnavailableError, match=f"127.0.0.1:{port}"):
        source.partitions()
    assert source.retries >= 2


def test_second_reader_of_an_open_partition_leaves_the_first_reading(kafka: Any) -> None:
    """Opening a partition that already has a reader (the runtime counting a replay) gives a
    reader of its own and leaves the first one reading every record."""
    topic = _topic(kafka, 1)
    _produce(kafka, topic, 0, [json.dumps({"n": i}).encode() for i in range(50)])
    source = _source(kafka, topic)

    def read_all(reader: Any) -> list[int]:
        offsets: list[int] = []
        while not reader.at_end:
            batch = reader.read(7)
            if batch is not None:
                offsets.extend(batch.locate(i) for i in range(len(batch.items)))
        return offsets

    first = source.open("0", 10, follow=False)
    probe = source.open("0", 20, follow=False)
    assert read_all(probe) == list(range(20, 50))
    probe.close()
    assert read_all(first) == list(range(10, 50))
    first.close()


def test_importing_resumeflow_does_not_import_the_kafka_client() -> None:
    """``import resumeflow`` and naming ``KafkaSource`` work without loading confluent-kafka
    (the core install stays light; the client is imported when a source first connects)."""
    code = ("import sys, resumeflow as rf; rf.sources.KafkaSource; "
            "rf.sources.KafkaSource('t', bootstrap='127.0.0.1:1', group_id='g'); "
            "assert 'confluent_kafka' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


class _FakeConsumer:
    """Unit-test stand-in for the client: ``consume`` runs the scripted group callbacks."""

    def __init__(self) -> None:
        self.script: list[tuple[str, list[int]]] = []
        self.assigned: dict[int, int] = {}
        self.calls: list[tuple[str, Any]] = []

    def subscribe(self, topics: list[str], **callbacks: Any) -> None:
        self.callbacks = callbacks

    def consume(self, n: int, timeout: float) -> list[Any]:
        from confluent_kafka import TopicPartition

        script, self.script = self.script, []
        for kind, parts in script:
            self.callbacks[f"on_{kind}"](self, [TopicPartition("t", p) for p in parts])
        return []

    def incremental_assign(self, tps: list[Any]) -> None:
        self.calls.append(("assign", [(tp.partition, tp.offset) for tp in tps]))
        self.assigned.update((tp.partition, tp.offset) for tp in tps)

    def incremental_unassign(self, tps: list[Any]) -> None:
        self.calls.append(("unassign", [tp.partition for tp in tps]))
        for tp in tps:
            del self.assigned[tp.partition]

    def assignment(self) -> list[Any]:
        from confluent_kafka import TopicPartition

        return [TopicPartition("t", p) for p in self.assigned]

    def pause(self, tps: list[Any]) -> None: ...

    def resume(self, tps: list[Any]) -> None: ...

    def close(self) -> None:
        self.calls.append(("close", None))


def test_group_callbacks_become_gains_losses_and_hand_overs() -> None:
    """Assignments are reported as gained and fetched only once a task opens at its own
    offset; a revocation runs the release handler before the partition is unassigned; a loss
    and a new assignment in one poll are both reported; an assignment revoked before the poll
    is not."""
    pytest.importorskip("confluent_kafka")
    source = rf.sources.KafkaSource("t", bootstrap="127.0.0.1:1", group_id="g")
    fake = _FakeConsumer()
    source._consumer = fake  # type: ignore[assignment]
    group = source.membership()
    group.on_release(lambda parts: fake.calls.append(("handler", parts)))
    group.join(["0", "1", "2", "3"])

    fake.script = [("assign", [0, 1, 2])]
    assert group.poll() == (["0", "1", "2"], [])
    assert fake.calls == [("assign", [])], "nothing is fetched before a task opens"
    reader = source.open("0", 5, follow=True)
    assert fake.calls[-1] == ("assign", [(0, 5)])

    fake.calls.clear()
    fake.script = [("revoke", [0, 1])]
    assert group.poll() == ([], ["0", "1"])
    assert fake.calls == [("handler", ["0", "1"]), ("unassign", [0])]
    reader.close()

    fake.calls.clear()
    fake.script = [("lost", [2]), ("assign", [2]), ("assign", [3]), ("revoke", [3])]
    assert group.poll() == (["2"], ["2"])
    group.leave()
    assert fake.calls[-1] == ("close", None)


def test_brokers_down_past_the_outage_budget_make_the_group_unavailable() -> None:
    """A group member whose brokers stay unreachable past the outage budget checks them with
    retried metadata calls and then raises UnavailableError, instead of idling forever."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    source = rf.sources.KafkaSource("t", bootstrap=f"127.0.0.1:{port}", group_id="g",
                                    timeout_s=0.3, retry_budget=1, retry_backoff_base_s=0.01,
                                    retry_backoff_max_s=0.02, outage_budget_s=0.5)
    group = source.membership()
    group.join(["0"])
    deadline = time.monotonic() + 30
    try:
        with pytest.raises(UnavailableError, match="reaching the brokers"):
            while time.monotonic() < deadline:
                assert group.poll() == ([], [])
                time.sleep(0.05)
    finally:
        group.leave()
    assert source.retries >= 2


def test_resuming_below_the_log_start_is_a_clear_data_error(kafka: Any) -> None:
    """A checkpoint whose offset the broker no longer has (records deleted before they were
    processed) fails with a DataError naming topic, partition and offset, never a silent
    jump to another offset."""
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import AdminClient

    topic = _topic(kafka, 1)
    _produce(kafka, topic, 0, [json.dumps({"n": i}).encode() for i in range(10)])
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
    for future in admin.delete_records([TopicPartition(topic, 0, 6)]).values():
        future.result(30)
    reader = _source(kafka, topic).open("0", 2, follow=False)
    try:
        with pytest.raises(DataError, match=rf"topic '{topic}' partition 0.*offset 2"):
            for _ in range(200):
                reader.read(10)
                time.sleep(0.01)
    finally:
        reader.close()
