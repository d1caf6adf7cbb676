"""KafkaSink without a broker: the core import stays light and bad configuration fails early."""

from __future__ import annotations

import sys

import pytest

from resumeflow.errors import ConfigurationError
from resumeflow.sinks import KafkaSink, SinkContext


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
