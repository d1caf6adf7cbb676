"""Kafka topic source: one partition per task, the position is the offset of the next record.

Guarantees. ``open(partition, offset)`` assigns the partition at exactly that offset (our
commit record's position, never the broker's committed offset) and yields every committed
record from there in offset order (``isolation.level=read_committed``: records of aborted
transactions are never seen). Offsets may have gaps (transaction markers, compaction): a batch
starts at the reader's position and ``locate`` gives each record's own offset, so the next
position after a batch is its last offset + 1 and a resume at any reported position skips
nothing. Partition ids are the partition numbers as decimal strings (``"0"``, ``"1"``...), so a
task id reads ``FLOW:TOPIC:N``.

One consumer per source object (per worker) serves every partition; messages are demultiplexed
into per-partition buffers, and a partition whose buffer is full is paused until its task
catches up. With a runtime, ``membership()`` makes the consumer group
(``partition.assignment.strategy=cooperative-sticky``) decide which partitions this worker
runs: an assigned partition is reported as gained and only fetched once the runtime opens its
task at the committed offset; a revoked one is handed back to the runtime, which commits and
closes its task before the consumer lets it go (``HandsOver``); a lost one (session timed out)
is dropped, and the new owner's epoch fences anything this worker still tries to commit.

After each of our checkpoints the consumer also commits the offset to the broker,
asynchronously, as advice for other tools (lag monitors); failures are only logged, since the
commit record is the truth. Transient failures of metadata calls are retried with capped
exponential backoff and full jitter within ``retry_budget`` attempts, counted in ``retries``
and logged, then raise ``UnavailableError``; fetching recovers by itself (librdkafka
reconnects) and its transient errors are counted and logged, until every broker has been
unreachable for ``outage_budget_s``: then a retried metadata call decides, and its failure
raises ``UnavailableError``. A record that does not decode
raises ``BadRecordError`` naming topic, partition and offset (the runtime dead-letters it).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from .._logrepeat import RepeatFilter
from ..errors import BadRecordError, ConfigurationError, DataError, UnavailableError
from ._base import Batch

if TYPE_CHECKING:
    from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

    from ._kafka_group import KafkaGroup

__all__ = ["KafkaRecord", "KafkaSource"]

log = logging.getLogger("resumeflow.sources.kafka")
_client_log = logging.getLogger("resumeflow.sources.kafka.client")
_client_log.addFilter(RepeatFilter())

_T = TypeVar("_T")
_decoder = msgspec.json.Decoder()

_FIXED: dict[str, Any] = {
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    "isolation.level": "read_committed",
    "partition.assignment.strategy": "cooperative-sticky",
    "enable.partition.eof": True,
    "auto.offset.reset": "error",
}
"""Settings the guarantees depend on; a conflicting user setting is refused."""

_DEFAULTS: dict[str, Any] = {"reconnect.backoff.max.ms": 1000, "session.timeout.ms": 10_000,
                             "fetch.wait.max.ms": 100}
_SECRET_WORDS = ("password", "secret", "token", "key")
_BEGINNING = -2  # librdkafka's OFFSET_BEGINNING


class KafkaRecord:
    """One message as a source item: ``decode`` gets it, dead letters show it."""

    __slots__ = ("message",)

    def __init__(self, message: Message) -> None:
        self.message = message

    @property
    def offset(self) -> int:
        return self.message.offset() or 0

    @property
    def value(self) -> bytes | None:
        return self.message.value()

    @property
    def key(self) -> bytes | None:
        return self.message.key()

    def _identity(self) -> tuple[Any, ...]:
        m = self.message
        return (m.topic(), m.partition(), m.offset(), m.key(), m.value())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KafkaRecord):
            return NotImplemented
        return self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash(self._identity())

    def __repr__(self) -> str:
        m = self.message
        value = m.value()
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else repr(value)
        return (f"KafkaRecord(topic={m.topic()!r}, partition={m.partition()}, "
                f"offset={m.offset()}, key={m.key()!r}, value={text[:2000]!r})")


def _json_value(record: KafkaRecord) -> Any:
    value = record.value
    if value is None:
        raise ValueError("the record has no value (a tombstone); pass decode= to handle it")
    return _decoder.decode(value)


class KafkaSource:
    """Read a Kafka topic; one task per partition.

    Args:
        topic: the topic; it must exist.
        bootstrap: ``bootstrap.servers`` of the cluster.
        group_id: the consumer group the workers of this flow share.
        config: further librdkafka consumer settings (security, ``session.timeout.ms``...);
            secrets in it are never logged. Settings the guarantees rely on are fixed:
            ``enable.auto.commit=false``, ``isolation.level=read_committed``,
            ``partition.assignment.strategy=cooperative-sticky``.
        name: source name in task ids (default: the topic). Keep it stable.
        decode: turns a ``KafkaRecord`` into the flow's value (default: its value as JSON).
        max_buffered_records: records buffered per partition before it is paused.
        timeout_s: timeout of one metadata call.
        retry_budget: attempts of a metadata call before ``UnavailableError``.
        outage_budget_s: how long every broker may stay unreachable before the source checks
            them with a (retried) metadata call, whose failure raises ``UnavailableError``.
        retry_backoff_base_s: first backoff (full jitter, doubling).
        retry_backoff_max_s: cap of the backoff.
        rng: the jitter's random source.

    Attributes:
        retries: transient failures retried so far (metadata calls and fetch errors).
        rebalances: assignments, revocations and losses seen by the group membership.
    """

    def __init__(self, topic: str, *, bootstrap: str, group_id: str,
                 config: Mapping[str, Any] | None = None, name: str | None = None,
                 decode: Callable[[KafkaRecord], Any] | None = None,
                 max_buffered_records: int = 10_000, timeout_s: float = 10.0,
                 retry_budget: int = 8, retry_backoff_base_s: float = 0.1,
                 retry_backoff_max_s: float = 5.0, outage_budget_s: float = 60.0,
                 rng: random.Random | None = None) -> None:
        if not topic or not bootstrap or not group_id:
            raise ConfigurationError("KafkaSource needs a topic, bootstrap and group_id")
        config = dict(config or {})
        for key, value in config.items():
            if key in _FIXED and str(value).lower() != str(_FIXED[key]).lower():
                raise ConfigurationError(
                    f"KafkaSource: {key}={value!r} would break its guarantees; remove it "
                    f"(it is always {_FIXED[key]!r})")
            if key in ("bootstrap.servers", "group.id"):
                raise ConfigurationError(f"KafkaSource: pass {key} as an argument, not in config")
        if max_buffered_records < 1 or retry_budget < 0 or timeout_s <= 0:
            raise ConfigurationError("KafkaSource: max_buffered_records >= 1, retry_budget >= 0 "
                                     "and timeout_s > 0 are required")
        self.topic = topic
        self.name = name or topic
        self.bootstrap = bootstrap
        self.group_id = group_id
        self._config = config
        self._decode = decode or _json_value
        self.max_buffered_records = max_buffered_records
        self.timeout_s = timeout_s
        self.retry_budget = retry_budget
        self.retry_backoff_base_s = retry_backoff_base_s
        self.retry_backoff_max_s = retry_backoff_max_s
        self.outage_budget_s = outage_budget_s
        self._down_since: float | None = None
        self._rng = rng or random.Random()
        self.retries = 0
        self.rebalances = 0
        self._consumer: Consumer | None = None
        self._readers: dict[int, _KafkaReader] = {}
        self._group: KafkaGroup | None = None
        self._commit_failures = 0
        self._advice: dict[int, int] = {}
        """Advised offsets the broker has not acknowledged yet, per partition."""
        self._advice_failed = False
        self._transient_logged: dict[int, tuple[float, int]] = {}

    def __repr__(self) -> str:
        return f"KafkaSource({self.topic!r}, group_id={self.group_id!r})"

    # -- the client --------------------------------------------------------------------------

    def client_config(self) -> dict[str, Any]:
        conf: dict[str, Any] = dict(_DEFAULTS)
        conf.update(self._config)
        conf.update(_FIXED)
        conf.update({"bootstrap.servers": self.bootstrap, "group.id": self.group_id,
                     "error_cb": self._on_error, "on_commit": self._on_commit})
        return conf

    def redact(self, text: str) -> str:
        """``text`` without the values of secret settings."""
        for k, v in self._config.items():
            if any(w in k.lower() for w in _SECRET_WORDS) and isinstance(v, str) and v:
                text = text.replace(v, "***")
        return text

    def consumer(self) -> Consumer:
        """The worker's one consumer, created on first use."""
        if self._consumer is None:
            try:
                from confluent_kafka import Consumer
            except ImportError:
                raise ConfigurationError(
                    "KafkaSource needs confluent-kafka: pip install 'resumeflow[kafka]'"
                ) from None
            try:
                self._consumer = Consumer(self.client_config(), logger=_client_log)
            except Exception as exc:  # KafkaException or ValueError on a bad setting
                raise ConfigurationError(f"{self!r}: bad consumer configuration: "
                                         f"{self.redact(str(exc))}") from exc
        return self._consumer

    def _release_consumer(self) -> None:
        """Close the consumer once nothing uses it (no group, no open reader)."""
        if self._consumer is not None and self._group is None and not self._readers:
            self.flush_advice()
            consumer, self._consumer = self._consumer, None
            consumer.close()

    def flush_advice(self) -> None:
        """Before the consumer closes: wait (at most ``min(timeout_s, 5)`` s) until the
        broker acknowledged every advised offset, re-sending those that failed. Closing the
        client drops commits still waiting for the group coordinator, and the last advice of
        a run is the one lag monitors need."""
        consumer = self._consumer
        if consumer is None or not self._advice:
            return
        deadline = time.monotonic() + min(self.timeout_s, 5.0)
        while self._advice and time.monotonic() < deadline:
            if self._advice_failed:
                self._advice_failed = False
                self._send_advice(dict(self._advice))
            consumer.poll(0.05)  # serves the commit callbacks
        if self._advice:
            log.warning("%r: advisory offsets %s not acknowledged before closing; our commit "
                        "records stay the truth", self, dict(sorted(self._advice.items())))

    def retry(self, what: str, call: Callable[[], _T]) -> _T:
        """``call()``, retrying transient failures with capped, fully jittered backoff."""
        from confluent_kafka import KafkaException

        attempt = 0
        while True:
            try:
                return call()
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                if not _transient(err):
                    raise UnavailableError(f"{self!r}: {what} failed: "
                                           f"{self.redact(str(exc))}") from exc
                attempt += 1
                if attempt > self.retry_budget:
                    raise UnavailableError(
                        f"{self!r}: {what} still failing after {self.retry_budget} retries: "
                        f"{self.redact(str(exc))}; check that the brokers at "
                        f"{self.bootstrap} are reachable") from exc
                cap = min(self.retry_backoff_max_s, self.retry_backoff_base_s * 2 ** (attempt - 1))
                delay = self._rng.uniform(0, cap)
                self.retries += 1
                log.warning("%r: %s failed (%s); retry %d of %d in %.2f s", self, what,
                            self.redact(str(exc)), attempt, self.retry_budget, delay)
                time.sleep(delay)

    def _on_error(self, err: KafkaError) -> None:
        from confluent_kafka import KafkaError as E

        if err.fatal():
            log.error("%r: fatal client error: %s", self, self.redact(err.str()))
            return
        if err.code() == E._ALL_BROKERS_DOWN and self._down_since is None:
            self._down_since = time.monotonic()
        self.retries += 1
        self._log_transient(err.code(), f"{self.redact(err.str())} (the client retries by itself)")

    def _log_transient(self, code: int, message: str) -> None:
        """Log a transient error: the first of its kind, then at most once per 10 s."""
        now = time.monotonic()
        last, count = self._transient_logged.get(code, (-math.inf, 0))
        if now - last < 10.0:
            self._transient_logged[code] = (last, count + 1)
            return
        self._transient_logged[code] = (now, 0)
        more = f" ({count} more like it in the last 10 s)" if count else ""
        log.warning("%r: %s%s; %d transient errors so far", self, message, more, self.retries)

    def _on_commit(self, err: KafkaError | None, offsets: list[TopicPartition]) -> None:
        if err is None:
            for tp in offsets:
                if tp.error is None and tp.topic == self.topic and \
                        tp.offset >= self._advice.get(tp.partition, tp.offset + 1):
                    del self._advice[tp.partition]
            return
        self._advice_failed = True
        self._commit_failures += 1
        if self._commit_failures == 1 or self._commit_failures % 100 == 0:
            log.warning("%r: advisory offset commit failed (%d so far): %s; our commit "
                        "records stay the truth", self, self._commit_failures,
                        self.redact(err.str()))

    # -- the Source contract -------------------------------------------------------------

    def partitions(self) -> list[str]:
        meta = self.retry("reading the topic's metadata", lambda: self.consumer().list_topics(
            self.topic, timeout=self.timeout_s))
        try:
            topic = meta.topics.get(self.topic)
            if topic is None or topic.error is not None or not topic.partitions:
                why = "" if topic is None or topic.error is None else f" ({topic.error})"
                raise ConfigurationError(
                    f"topic {self.topic!r} does not exist on {self.bootstrap}{why}; create it "
                    "first (its partition count fixes the number of tasks)")
            return [str(p) for p in sorted(topic.partitions)]
        finally:
            self._release_consumer()

    def open(self, partition: str, position: Any | None, *, follow: bool) -> _KafkaReader:
        try:
            number = int(partition)
        except ValueError:
            raise ConfigurationError(f"{self!r}: partition {partition!r} is not a partition "
                                     "number") from None
        if number in self._readers:
            # A second reader of an open partition (the runtime counting a replay ahead of
            # the task's reader) reads through a consumer of its own, outside the group.
            return self._standalone().open(partition, position, follow=follow)
        reader = _KafkaReader(self, number, None if position is None else int(position),
                              follow=follow)
        self._readers[number] = reader
        return reader

    def _standalone(self) -> KafkaSource:
        return KafkaSource(self.topic, bootstrap=self.bootstrap, group_id=self.group_id,
                           config=self._config, name=self.name, decode=self._decode,
                           max_buffered_records=self.max_buffered_records,
                           timeout_s=self.timeout_s, retry_budget=self.retry_budget,
                           retry_backoff_base_s=self.retry_backoff_base_s,
                           retry_backoff_max_s=self.retry_backoff_max_s,
                           outage_budget_s=self.outage_budget_s, rng=self._rng)

    def decode(self, raw: KafkaRecord) -> Any:
        try:
            if self._decode is _json_value:
                return _decoder.decode(raw.message.value())  # type: ignore[arg-type]
            return self._decode(raw)
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}"
            if raw.message.value() is None and self._decode is _json_value:
                why = "it has no value (a tombstone); pass decode= to handle tombstones"
            raise BadRecordError(f"cannot decode record: {why}",
                                 source=f"{self.name} (topic {self.topic})",
                                 partition=str(raw.message.partition()),
                                 position=raw.message.offset()) from exc

    def membership(self) -> KafkaGroup:
        """The consumer group as this worker's membership (one per source object)."""
        from ._kafka_group import KafkaGroup

        if self._group is None:
            self._group = KafkaGroup(self)
        return self._group

    # -- fetching ----------------------------------------------------------------------------

    def pump(self, timeout_s: float) -> None:
        """Fetch what the consumer has and hand each message to its partition's reader;
        runs the group's callbacks."""
        consumer = self.consumer()
        room = self.max_buffered_records * max(1, len(self._readers))
        messages = consumer.consume(min(room, 100_000), timeout_s)
        if messages:
            self._down_since = None
        elif self._down_since is not None and \
                time.monotonic() - self._down_since > self.outage_budget_s:
            self._check_brokers()
        readers = self._readers
        for m in messages:
            err = m.error()
            if err is not None:
                self._fetch_error(m, err)
                continue
            reader = readers.get(m.partition())  # type: ignore[arg-type]
            if reader is not None:
                reader.buffer.append(m)
        for reader in list(readers.values()):
            if reader.buffered >= self.max_buffered_records and not reader.paused:
                reader.pause(True)

    def _check_brokers(self) -> None:
        """Every broker has been unreachable past the outage budget: ask for metadata (with
        retries); ``UnavailableError`` if they still do not answer."""
        log.warning("%r: no broker reachable for %.0f s; checking them", self,
                    time.monotonic() - (self._down_since or 0))
        consumer = self.consumer()
        self.retry("reaching the brokers", lambda: consumer.list_topics(
            self.topic, timeout=self.timeout_s))
        self._down_since = None

    def _fetch_error(self, m: Message, err: KafkaError) -> None:
        from confluent_kafka import KafkaError as E

        reader = self._readers.get(m.partition())  # type: ignore[arg-type]
        if err.code() == E._PARTITION_EOF:
            if reader is not None:
                reader.reached_end(m.offset() or 0)
            return
        if err.code() == E._AUTO_OFFSET_RESET and reader is not None:
            raise DataError(
                f"topic {self.topic!r} partition {m.partition()}: the checkpoint resumes at "
                f"offset {reader.position}, which the broker no longer has ({err.str()}): "
                "records were deleted (retention) before this flow processed them, or the "
                "topic was recreated. Rewind the task with `resumeflow checkpoints rewind`, "
                "and raise the topic's retention")
        if err.fatal() or not _transient(err):
            raise UnavailableError(f"{self!r}: fetching partition {m.partition()} failed: "
                                   f"{self.redact(err.str())}")
        self.retries += 1
        self._log_transient(err.code(), f"fetching partition {m.partition()}: "
                                        f"{self.redact(err.str())} (retrying)")

    def assign(self, number: int, offset: int) -> None:
        from confluent_kafka import TopicPartition

        self.consumer().incremental_assign([TopicPartition(self.topic, number, offset)])

    def unassign(self, numbers: Sequence[int]) -> None:
        """Stop fetching ``numbers`` (those actually assigned); always calls the client, so
        inside a rebalance callback it also tells it the revocation was handled."""
        from confluent_kafka import TopicPartition

        consumer = self._consumer
        if consumer is None:
            return
        assigned = {tp.partition for tp in consumer.assignment() if tp.topic == self.topic}
        consumer.incremental_unassign(
            [TopicPartition(self.topic, n) for n in numbers if n in assigned])

    def advise(self, number: int, offset: int) -> None:
        """Commit ``offset`` to the broker, asynchronously, as advice for other tools."""
        if self._consumer is None:
            return
        self._advice[number] = offset
        self._send_advice({number: offset})

    def _send_advice(self, offsets: Mapping[int, int]) -> None:
        from confluent_kafka import KafkaException, TopicPartition

        if self._consumer is None:
            return
        try:
            self._consumer.commit(offsets=[TopicPartition(self.topic, n, o)
                                           for n, o in offsets.items()], asynchronous=True)
        except KafkaException as exc:
            self._on_commit(exc.args[0] if exc.args else None, [])


class _KafkaReader:
    """One partition of a ``KafkaSource``: reads its buffer, fed by the shared consumer."""

    def __init__(self, source: KafkaSource, number: int, position: int | None, *,
                 follow: bool) -> None:
        self.source = source
        self.number = number
        self.position = 0 if position is None else position
        self.buffer: list[Message] = []
        """Fetched messages; those before ``_head`` are already read."""
        self._head = 0
        self.paused = False
        self._follow = follow
        self._at_end = False
        self._eof = False
        self._heard = False
        self._closed = False
        source.assign(number, _BEGINNING if position is None else position)

    @property
    def at_end(self) -> bool:
        return self._at_end

    def reached_end(self, offset: int) -> None:
        """The fetch reached the partition's end (every record before it is buffered)."""
        self._eof = not self._follow
        self._heard = True

    def read(self, max_records: int) -> Batch | None:
        if self._at_end:
            return None
        source = self.source
        if not self.buffered and source._group is None:
            self._fetch_alone()
        head, buffer = self._head, self.buffer
        if head >= len(buffer):
            self._at_end = self._eof
            return None
        chunk = buffer[head:head + max_records]
        head += len(chunk)
        if head > 4096 and head * 2 > len(buffer):
            del buffer[:head]
            head = 0
        self._head = head
        if self.paused and self.buffered < source.max_buffered_records // 2:
            self.pause(False)
        start = self.position
        if (chunk[0].offset() or 0) < start:  # fetched before a re-assign: already read
            chunk = [m for m in chunk if (m.offset() or 0) >= start]
            if not chunk:
                return None
        items = list(map(KafkaRecord, chunk))
        end = (chunk[-1].offset() or 0) + 1
        self.position = end
        return Batch(items=items, start=start, end=end, locate=lambda i: items[i].offset)

    def _fetch_alone(self) -> None:
        """Pump the consumer ourselves (no group polls it). Until the partition's first fetch
        answers (records or its end), wait for it, so "nothing now" is never said of a
        partition not fetched yet (a replay count would read it as the end)."""
        source = self.source
        deadline = time.monotonic() + min(2.0, source.timeout_s)
        while True:
            source.pump(0.05 if not any(r.buffered for r in source._readers.values()) else 0)
            if self.buffered:
                self._heard = True
            if self._heard or self._eof or time.monotonic() > deadline:
                return

    @property
    def buffered(self) -> int:
        return len(self.buffer) - self._head

    def drop_buffer(self) -> None:
        self.buffer.clear()
        self._head = 0

    def pause(self, on: bool) -> None:
        from confluent_kafka import TopicPartition

        consumer = self.source._consumer
        if consumer is None:
            return
        tp = [TopicPartition(self.source.topic, self.number)]
        if on:
            consumer.pause(tp)
        else:
            consumer.resume(tp)
        self.paused = on

    def committed(self, position: Any) -> None:
        """The task's checkpoint at ``position`` is durable: advise the broker."""
        if isinstance(position, int) and not self._closed:
            self.source.advise(self.number, position)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.drop_buffer()
        source = self.source
        if source._readers.get(self.number) is self:
            del source._readers[self.number]
        source.unassign([self.number])
        source._release_consumer()


def _transient(err: KafkaError | None) -> bool:
    from confluent_kafka import KafkaError as E

    if err is None or not hasattr(err, "code"):
        return False
    if err.fatal():
        return False
    return bool(err.retriable()) or err.code() in (
        E._TRANSPORT, E._ALL_BROKERS_DOWN, E._TIMED_OUT, E._MSG_TIMED_OUT, E._WAIT_COORD,
        E._RESOLVE, E.NOT_COORDINATOR, E.COORDINATOR_NOT_AVAILABLE,
        E.COORDINATOR_LOAD_IN_PROGRESS, E.LEADER_NOT_AVAILABLE, E.NOT_LEADER_FOR_PARTITION,
        E.REQUEST_TIMED_OUT, E.NETWORK_EXCEPTION, E.UNKNOWN_TOPIC_OR_PART)
