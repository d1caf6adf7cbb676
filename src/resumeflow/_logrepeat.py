"""A logging filter that lets a repeated line through once per period.

librdkafka logs every failed reconnect as its own error line (dozens in a few seconds of a
broker outage); the Kafka connectors pass these lines to Python logging, so an outage would
flood a worker's log. Lines that differ only in their numbers (ports, milliseconds, counts)
count as the same line: the first passes, the rest within the period are counted and the next
one to pass says how many were not shown.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable

__all__ = ["RepeatFilter"]

_DIGITS = re.compile(r"\d+")
_MAX_SHAPES = 1000


class RepeatFilter(logging.Filter):
    """Pass each shape of line at most once per ``period_s``; thread-safe."""

    def __init__(self, period_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.period_s = period_s
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        shape = (record.name, record.levelno, _DIGITS.sub("N", message))
        now = self._clock()
        with self._lock:
            last, hidden = self._seen.get(shape, (-float("inf"), 0))
            if now - last < self.period_s:
                self._seen[shape] = (last, hidden + 1)
                return False
            if len(self._seen) >= _MAX_SHAPES:
                self._seen.clear()
            self._seen[shape] = (now, 0)
        if hidden:
            record.msg = f"{message} ({hidden} alike lines in the last {self.period_s:g} s " \
                         "not shown)"
            record.args = ()
        return True
