"""RepeatFilter: a line repeated with only its numbers changed passes once per period."""

from __future__ import annotations

import logging

from resumeflow._logrepeat import RepeatFilter


def _record(message: str, *args: object, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord("resumeflow.sources.kafka.client", level, __file__, 1, message,
                             args, None)


def test_alike_lines_pass_once_per_period_and_the_next_counts_the_hidden_ones() -> None:
    """Reconnect lines differing only in their numbers pass once per 10 s; the first one
    after the period says how many were hidden, and other lines are never held back."""
    now = [0.0]
    f = RepeatFilter(10.0, clock=lambda: now[0])
    line = "Connect to ipv4#127.0.0.1:%d failed: Connection refused (after %dms)"
    assert f.filter(_record(line, 40279, 0))
    passed = []
    for i in range(30):
        now[0] += 0.25
        passed.append(f.filter(_record(line, 40279, i)))
    assert not any(passed)
    assert f.filter(_record("Broker: Coordinator not available"))
    assert f.filter(_record(line, 40279, 0, level=logging.WARNING))  # another level, its own
    now[0] = 10.5
    again = _record(line, 40279, 3)
    assert f.filter(again)
    assert again.getMessage() == ("Connect to ipv4#127.0.0.1:40279 failed: Connection refused "
                                  "(after 3ms) (30 alike lines in the last 10 s not shown)")


def test_the_kafka_client_loggers_carry_the_filter() -> None:
    """The source's and the sink's librdkafka loggers both fold repeated lines."""
    import resumeflow.sinks._kafka
    import resumeflow.sources._kafka  # noqa: F401

    for name in ("resumeflow.sources.kafka.client", "resumeflow.sinks.kafka.client"):
        assert any(isinstance(f, RepeatFilter) for f in logging.getLogger(name).filters), name
