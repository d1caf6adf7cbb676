"""The test tooling's real Kafka broker: it starts, serves clients, and keeps its data across
a restart."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from resumeflow.testing._kafka_broker import (
    BrokerStartError,
    KafkaBroker,
    create_topic,
    fetch,
    lib_dir,
    produce_json,
    read_topic,
)

pytestmark = pytest.mark.slow


def test_broker_serves_produce_and_consume(kafka: Any) -> None:
    """Records produced to a three-partition topic are read back in order within each
    partition, each key always on one partition."""
    create_topic(kafka.bootstrap, "broker-basic", partitions=3)
    pairs = [(f"k{i % 7}", {"n": i}) for i in range(60)]
    assert produce_json(kafka.bootstrap, "broker-basic", pairs, key="pairs") == 60
    got = read_topic(kafka.bootstrap, "broker-basic")
    assert sorted(m.value["n"] for m in got) == list(range(60))
    assert {m.partition for m in got} <= {0, 1, 2}
    for key in {k for k, _ in pairs}:
        mine = [m for m in got if m.key == key]
        assert len({m.partition for m in mine}) == 1
        assert [m.value for m in mine] == [v for k, v in pairs if k == key]


def test_read_committed_hides_aborted_and_open_transactions(kafka: Any) -> None:
    """read_topic under read_committed returns committed transactional records only and stops
    at an open transaction."""
    from confluent_kafka import Producer

    create_topic(kafka.bootstrap, "broker-txn")
    producer = Producer({"bootstrap.servers": kafka.bootstrap,
                         "transactional.id": "broker-test-txn"})
    producer.init_transactions(30)
    for value, finish in (("aborted", producer.abort_transaction),
                          ("committed", producer.commit_transaction)):
        producer.begin_transaction()
        producer.produce("broker-txn", value=f'"{value}"'.encode())
        producer.flush(30)  # on the broker before an abort, not purged from the queue
        finish(30)
    producer.begin_transaction()
    producer.produce("broker-txn", value=b'"open"')
    producer.flush(30)
    assert [m.value for m in read_topic(kafka.bootstrap, "broker-txn")] == ["committed"]
    uncommitted = read_topic(kafka.bootstrap, "broker-txn", isolation="read_uncommitted")
    assert [m.value for m in uncommitted] == ["aborted", "committed", "open"]
    producer.abort_transaction(30)


def test_restart_keeps_data_and_address(kafka: Any) -> None:
    """After stop() and start() the broker serves on the same address with every record it held
    before, and takes new ones."""
    create_topic(kafka.bootstrap, "broker-restart", partitions=2)
    produce_json(kafka.bootstrap, "broker-restart", [{"n": i} for i in range(10)])
    address = kafka.bootstrap
    kafka.stop()
    assert not kafka.running
    kafka.start()
    assert kafka.bootstrap == address
    produce_json(kafka.bootstrap, "broker-restart", [{"n": i} for i in range(10, 15)])
    got = read_topic(kafka.bootstrap, "broker-restart")
    assert sorted(m.value["n"] for m in got) == list(range(15))


def test_fetch_is_cached(kafka: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Once fetched, the jars are found in the cache without Maven being called again."""
    monkeypatch.setenv("PATH", str(tmp_path))  # no mvn reachable
    assert shutil.which("mvn") is None
    lib = fetch()
    assert lib == lib_dir().resolve()
    assert any(p.name.startswith("kafka_2.13-") for p in lib.glob("*.jar"))


def test_failed_start_reports_the_broker_log(kafka: Any, tmp_path: Path) -> None:
    """A broker whose configuration is unusable raises BrokerStartError quoting what Kafka
    said."""
    broker = KafkaBroker(data_dir=tmp_path / "bad", start_timeout_s=60,
                         overrides={"log.segment.bytes": "not-a-number"})
    with pytest.raises(BrokerStartError) as info:
        broker.start()
    broker.close()
    assert "log.segment.bytes" in str(info.value)
