"""KafkaSink without a broker: the core import stays light and bad configuration fails early."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import pytest

from resumeflow.errors import ConfigurationError, UnavailableError
from resumeflow.sinks import KafkaSink, SinkContext
from resumeflow.sinks._kafka import _KafkaWriter


def test_sink_is_importable_and_says_how_to_install_the_client(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without confluent-kafka a KafkaSink is still built, and opening it names the extra to
    install."""
    monkeypatch.setitem(sys.modules, "confluent_kafka", None)
    sink = KafkaSink("out", bootstrap="127.0.0.1:9092")
    ctx = SinkContext(sink_id="out", task="t", partition="0", partitions=1, keyed=True,
                      guarantee="exactly-once", store_path=None)
    with pytest.raises(ConfigurationError, match=r"resumeflow\[kafka\]"):
        sink.open(ctx)


@pytest.mark.parametrize(("topic", "bootstrap", "needle"), [
    ("", "127.0.0.1:9092", "needs a topic"),
    ("out", "", "needs bootstrap"),
])
def test_missing_topic_or_bootstrap_is_refused(topic: str, bootstrap: str, needle: str) -> None:
    """A KafkaSink without a topic or a bootstrap address is refused when it is built."""
    with pytest.raises(ConfigurationError, match=needle):
        KafkaSink(topic, bootstrap=bootstrap)


class _HangingProducer:
    """A stand-in for confluent_kafka.Producer whose ``hang`` call blocks until released,
    as librdkafka was seen to after a broker restart."""

    def __init__(self, hang: str) -> None:
        self.hang = hang
        self.release = threading.Event()
        self.calls: list[str] = []

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if name == self.hang:
            self.release.wait(30)

    def init_transactions(self, timeout: float) -> None:
        self._call("init_transactions")

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> None:
        self._call("list_topics")

    def begin_transaction(self) -> None:
        self._call("begin_transaction")

    def produce(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        self._call("produce")

    def send_offsets_to_transaction(self, offsets: Any, meta: Any, timeout: float) -> None:
        self._call("send_offsets_to_transaction")

    def commit_transaction(self, timeout: float) -> None:
        self._call("commit_transaction")


def _writer(fake: _HangingProducer) -> Any:
    pytest.importorskip("confluent_kafka")
    sink = KafkaSink("out", bootstrap="127.0.0.1:9", op_timeout_s=0.05)
    ctx = SinkContext(sink_id="out", task="t", partition="0", partitions=1, keyed=False,
                      guarantee="exactly-once", store_path=None)
    writer = _KafkaWriter(sink, ctx)
    writer._producer = fake  # type: ignore[assignment]
    writer._group_meta = object()
    return writer


@pytest.mark.parametrize("hang", ["commit_transaction", "send_offsets_to_transaction"])
def test_a_transactional_call_that_never_returns_restarts_the_task(hang: str) -> None:
    """A publish whose commit or offsets call hangs past its timeout fails as UnavailableError
    (the task restarts) and retires the producer, instead of stalling the commit thread."""
    fake = _HangingProducer(hang)
    writer = _writer(fake)
    writer.buffer.append({"id": 1})
    writer.precommit(1)
    began = time.monotonic()
    try:
        with pytest.raises(UnavailableError, match=r"no answer within 1\.1 s"):
            writer.finalize(1)
        assert time.monotonic() - began < 10
        with pytest.raises(UnavailableError):  # retired: every later call fails the same way
            writer.finalize(2)
    finally:
        fake.release.set()
    assert fake.calls[-1] == hang


def test_an_init_transactions_that_never_returns_fails_recovery() -> None:
    """Recovery whose init_transactions hangs past its timeout fails as UnavailableError."""
    fake = _HangingProducer("init_transactions")
    writer = _writer(fake)
    try:
        with pytest.raises(UnavailableError, match="initializing the transactional producer"):
            writer.recover(None, [])
    finally:
        fake.release.set()
