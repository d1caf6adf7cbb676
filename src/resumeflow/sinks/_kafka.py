"""Kafka topic sink, exactly-once with the store's commit as the commit point.

Under exactly-once, ``precommit(seq)`` only encodes the checkpoint's output: it goes into the
store's commit transaction as staged output, so once the store commit returns the output is
durable even though nothing is in Kafka yet. ``finalize(seq)`` then publishes it in one Kafka
transaction that also commits the offset ``seq`` of a per-task marker group: the records and
the fact "seq N of this task is published" become visible together or not at all.
``recover()`` starts the task's transactional producer (``init_transactions`` with an id
derived from the task, which fences the previous owner's producer and aborts what it left
open), reads the marker back (one offset fetch, no topic scan), and publishes again only the
staged checkpoints above it, in order. So a crash anywhere leaves each record in the topic's
committed output exactly once after recovery, in checkpoint order, and a ``read_committed``
reader never sees output of a checkpoint the store did not commit. A Kafka transaction cannot
be the commit point here: it cannot be prepared by one process and committed by another (see
docs/ARCHITECTURE.md, "Kafka sink").

Under at-least-once, an idempotent producer sends the output at ``precommit`` and waits for
every acknowledgement before the commit point; a replay repeats it.

Transient broker failures (broker down, timeouts, retriable errors) are retried with capped
exponential backoff and full jitter within a retry budget, counted in ``KafkaSink.retries``
and logged; then ``UnavailableError`` restarts the task from its checkpoint. A producer fenced
by a newer owner raises ``FencedError``. ``finalize`` may run on another thread than the one
filling ``buffer``.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from .._faults import crash_point
from .._logrepeat import RepeatFilter
from ..checkpoint import StagedEntry
from ..errors import (
    ClosedError,
    ConfigurationError,
    DataError,
    FencedError,
    UnavailableError,
    invariant,
)
from ._base import Precommit, SinkContext

if TYPE_CHECKING:
    from confluent_kafka import KafkaError, Producer

__all__ = ["KafkaSink"]

log = logging.getLogger("resumeflow.sinks.kafka")
_client_log = logging.getLogger("resumeflow.sinks.kafka.client")
_client_log.addFilter(RepeatFilter())

_encoder = msgspec.json.Encoder()
_Message = tuple[bytes | None, bytes]
_RawPair = tuple[msgspec.Raw, msgspec.Raw]
_T = TypeVar("_T")

_OURS = ("bootstrap.servers", "transactional.id", "enable.idempotence")
_SECRET_WORDS = ("password", "secret", "token", "key")
_DEFAULTS: dict[str, Any] = {"reconnect.backoff.max.ms": 1000}


class KafkaSink:
    """Write each item to a Kafka topic as a JSON value (keyed streams: JSON key too).

    Args:
        topic: the output topic; it must exist.
        bootstrap: ``bootstrap.servers`` of the cluster.
        config: further librdkafka producer settings (security, compression, ...); secrets in
            it are never logged.
        marker_topic: the topic under whose partition 0 each task's published ``seq`` is kept
            as a group offset (default: ``topic`` itself; it must exist).
        id_prefix: prefix of the transactional ids and marker groups; two pipelines sharing a
            flow name and a topic need different prefixes.
        connect_timeout_s: how long the first ``open`` waits for the cluster's metadata.
        op_timeout_s: timeout of one transactional call (init, offsets, commit, abort).
        retry_budget_s: total time one operation may spend retrying transient failures.
        retry_max_attempts: attempts of one operation before giving up.
        retry_backoff_base_s: first backoff (full jitter, doubling).
        retry_backoff_max_s: cap of the backoff.
        rng: the jitter's random source (inject for deterministic tests).
    """

    def __init__(self, topic: str, *, bootstrap: str, config: Mapping[str, Any] | None = None,
                 marker_topic: str | None = None, id_prefix: str = "resumeflow",
                 connect_timeout_s: float = 10.0, op_timeout_s: float = 10.0,
                 retry_budget_s: float = 60.0, retry_max_attempts: int = 12,
                 retry_backoff_base_s: float = 0.1, retry_backoff_max_s: float = 5.0,
                 rng: random.Random | None = None) -> None:
        if not isinstance(topic, str) or not topic.strip():
            raise ConfigurationError("KafkaSink needs a topic name, e.g. KafkaSink('orders-out', "
                                     "bootstrap='localhost:9092')")
        if not isinstance(bootstrap, str) or not bootstrap.strip():
            raise ConfigurationError(f"KafkaSink({topic!r}) needs bootstrap='host:port' of the "
                                     "Kafka cluster")
        clash = sorted(set(config or {}) & set(_OURS))
        if clash:
            raise ConfigurationError(
                f"KafkaSink({topic!r}): config sets {clash}, which the sink manages itself; "
                "pass bootstrap= and remove them from config")
        if retry_max_attempts < 1 or not 0 <= retry_backoff_base_s <= retry_backoff_max_s:
            raise ConfigurationError(
                f"KafkaSink({topic!r}): retries need retry_max_attempts >= 1 and "
                "0 <= retry_backoff_base_s <= retry_backoff_max_s")
        self.topic = topic
        self.bootstrap = bootstrap
        self.config = dict(config or {})
        self.marker_topic = marker_topic or topic
        self.id_prefix = id_prefix
        self.connect_timeout_s = connect_timeout_s
        self.op_timeout_s = op_timeout_s
        self.retry_budget_s = retry_budget_s
        self.retry_max_attempts = retry_max_attempts
        self.retry_backoff_base_s = retry_backoff_base_s
        self.retry_backoff_max_s = retry_backoff_max_s
        self.name = f"kafka:{topic}"
        self.retries = 0
        """Transient failures retried so far, by every writer of this sink."""
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._checked = False

    def __repr__(self) -> str:
        return f"KafkaSink({self.topic!r}, bootstrap={self.bootstrap!r})"

    def open(self, ctx: SinkContext) -> _KafkaWriter:
        """A writer for one task. The first open of this sink checks that the cluster answers
        and that the topics exist (``ConfigurationError`` otherwise)."""
        try:
            import confluent_kafka  # noqa: F401
        except ImportError as exc:
            raise ConfigurationError("KafkaSink needs confluent-kafka: pip install "
                                     "'resumeflow[kafka]'") from exc
        writer = _KafkaWriter(self, ctx)
        try:
            writer.check_topics(first=not self._checked)
        except BaseException:
            writer.close()
            raise
        self._checked = True
        return writer

    # -- shared by the writers -------------------------------------------------------------

    def client_config(self, **extra: Any) -> dict[str, Any]:
        return {**_DEFAULTS, **self.config, "bootstrap.servers": self.bootstrap, **extra}

    def redact(self, text: str) -> str:
        """``text`` with the value of every secret-looking setting replaced by ``***``."""
        for k, v in self.config.items():
            if any(w in k.lower() for w in _SECRET_WORDS) and isinstance(v, str) and v:
                text = text.replace(v, "***")
        return text

    def backoff_s(self, attempt: int) -> float:
        cap = min(self.retry_backoff_max_s, self.retry_backoff_base_s * 2 ** (attempt - 1))
        with self._lock:
            self.retries += 1
            return self._rng.uniform(0, cap)


def _fenced(err: KafkaError) -> bool:
    from confluent_kafka import KafkaError as E

    return err.code() in (E._FENCED, E.PRODUCER_FENCED, E.INVALID_PRODUCER_EPOCH)


class _KafkaWriter:
    def __init__(self, sink: KafkaSink, ctx: SinkContext) -> None:
        from confluent_kafka import Producer

        self.sink = sink
        self.ctx = ctx
        self.buffer: list[Any] = []
        self._keyed = ctx.keyed
        self._exactly_once = ctx.guarantee == "exactly-once"
        base = f"{sink.id_prefix}:{sink.topic}:{ctx.task}:{ctx.sink_id}"
        self.transactional_id = base
        self.marker_group = f"{base}:published"
        extra: dict[str, Any] = {"enable.idempotence": True}
        if self._exactly_once:
            extra["transactional.id"] = self.transactional_id
        try:
            self._producer: Producer | None = Producer(sink.client_config(**extra),
                                                       logger=_client_log)
        except Exception as exc:  # KafkaException or ValueError on a bad setting
            raise ConfigurationError(f"{sink!r}: bad producer configuration: "
                                     f"{sink.redact(str(exc))}") from exc
        self._group_meta: Any = None
        self._gone: Exception = ClosedError(f"{sink!r}: the writer of task {ctx.task} is closed")
        self._txn_lock = threading.Lock()  # one transactional call sequence at a time
        self._state = threading.Lock()  # _pending and _finalized
        self._pending: dict[int, list[_Message]] = {}
        self._finalized: int | None = None

    # -- opening ---------------------------------------------------------------------------

    def check_topics(self, *, first: bool) -> None:
        """Fail at start on an unreachable cluster or a missing topic."""
        def metadata() -> Any:
            return self._live().list_topics(timeout=self.sink.connect_timeout_s)

        try:
            meta = metadata() if first else self._retry("reading cluster metadata", metadata)
        except Exception as exc:
            if not first:
                raise
            raise ConfigurationError(
                f"{self.sink!r}: cannot reach Kafka at {self.sink.bootstrap!r} within "
                f"{self.sink.connect_timeout_s:g} s ({self.sink.redact(str(exc))}); check "
                "bootstrap= and that the brokers run and are reachable") from exc
        for topic in {self.sink.topic, self.sink.marker_topic}:
            if topic not in meta.topics or meta.topics[topic].error is not None:
                raise ConfigurationError(
                    f"{self.sink!r}: topic {topic!r} does not exist on {self.sink.bootstrap!r}; "
                    "create it first (kafka-topics --create --topic ...)")

    # -- recovery --------------------------------------------------------------------------

    def recover(self, meta: dict[str, Any] | None, staged: Sequence[StagedEntry]) -> None:
        if not self._exactly_once:
            return
        producer = self._live()
        with self._txn_lock:
            what = "initializing the transactional producer (fences the previous owner)"
            self._retry(what, lambda: self._bounded(
                what, lambda: producer.init_transactions(self.sink.op_timeout_s)))
            published = self._read_marker()
        committed = int(meta["seq"]) if meta else 0
        if published > committed:
            published = self._ahead(published, committed, meta)
        for entry in sorted(staged, key=lambda e: e.seq):
            if entry.seq > published:
                with self._txn_lock:
                    self._publish(entry.seq, _decode_payload(entry))
                published = entry.seq
        with self._state:
            self._finalized = max(published, committed) or None

    def _ahead(self, published: int, committed: int, meta: dict[str, Any] | None) -> int:
        """The marker is beyond the store's newest checkpoint: the store was rewound, reset,
        or lost every checkpoint to corruption. What Kafka holds cannot be taken back."""
        task = self.ctx.task
        if meta is None and not self.ctx.from_scratch:
            raise ConfigurationError(
                f"{self.sink!r}: topic already holds output of task {task!r} up to checkpoint "
                f"{published}, but the store has no checkpoint of it; run with the store that "
                "wrote it, write to a fresh topic, or give the sink another id_prefix")
        log.warning("%r: task %s resumes from checkpoint %d but checkpoints up to %d were "
                    "already published; their output stays in the topic and will be written "
                    "again", self.sink, task, committed, published)
        return committed

    def _read_marker(self) -> int:
        """The newest published ``seq`` of this task: one committed-offset fetch."""
        from confluent_kafka import Consumer, TopicPartition

        consumer = Consumer(self.sink.client_config(**{
            "group.id": self.marker_group, "enable.auto.commit": False,
            "isolation.level": "read_committed"}), logger=_client_log)
        try:
            if self._group_meta is None:
                self._group_meta = consumer.consumer_group_metadata()
            part = TopicPartition(self.sink.marker_topic, 0)
            got = self._retry("reading the published checkpoint", lambda: consumer.committed(
                [part], timeout=self.sink.op_timeout_s))
        finally:
            consumer.close()
        if got[0].error is not None:
            raise UnavailableError(f"{self.sink!r}: reading the published checkpoint of task "
                                   f"{self.ctx.task!r} failed: {got[0].error}")
        return max(0, got[0].offset or 0)

    # -- the checkpoint --------------------------------------------------------------------

    def _encode(self, items: list[Any]) -> list[_Message]:
        enc = _encoder.encode
        try:
            if self._keyed:
                return [(None if k is None else enc(k), enc(v)) for k, v in items]
            return [(None, enc(v)) for v in items]
        except TypeError as exc:
            raise DataError(f"output for {self.sink!r} is not JSON-serializable ({exc}); emit "
                            "dicts, lists, strings and numbers") from exc

    def precommit(self, seq: int) -> Precommit:
        messages = self._encode(self.buffer) if self.buffer else []
        self.buffer.clear()
        meta: dict[str, Any] = {"topic": self.sink.topic, "seq": seq, "records": len(messages)}
        if not self._exactly_once:
            if messages:
                self._send_acknowledged(messages)
            return Precommit(meta=meta)
        if not messages:
            return Precommit(meta=meta)
        with self._state:
            self._pending[seq] = messages
        payload = b"".join(b"[%b,%b]\n" % (k or b"null", v) for k, v in messages)
        return Precommit(meta=meta, staged=StagedEntry(sink=self.ctx.sink_id, seq=seq,
                                                       meta=meta, payload=payload))

    def finalize(self, seq: int) -> None:
        self._live()  # a fenced writer refuses every later finalize, even an empty one
        with self._state:
            messages = self._pending.pop(seq, None)
            done = self._finalized
        if messages and (done is None or seq > done):
            with self._txn_lock:
                self._publish(seq, messages)
        with self._state:
            self._finalized = max(seq, self._finalized or 0)

    def releasable(self) -> int | None:
        if not self._exactly_once:
            return None
        with self._state:
            return self._finalized

    # -- Kafka -----------------------------------------------------------------------------

    def _publish(self, seq: int, messages: list[_Message]) -> None:
        """One transaction: ``messages``, then the marker offset ``seq``; the caller holds
        ``_txn_lock``.

        An unreachable cluster is waited for (with retries) before the transaction begins, and
        a commit that fails transiently is called again, as librdkafka allows. Any other
        failure inside the transaction retires this producer and raises ``UnavailableError``:
        the task restarts and its next producer's ``init_transactions`` aborts what is left
        (retrying ``send_offsets_to_transaction`` after a transport error was seen to hang
        librdkafka 2.16 past its timeout).
        """
        from confluent_kafka import KafkaException, TopicPartition

        producer = self._live()
        invariant(self._group_meta is not None, f"{self.sink!r}: finalize before recover")
        marker = [TopicPartition(self.sink.marker_topic, 0, seq)]
        timeout = self.sink.op_timeout_s
        what = f"publishing checkpoint {seq}"
        self._retry("reaching the cluster", lambda: producer.list_topics(
            self.sink.topic, timeout=timeout))
        try:
            producer.begin_transaction()
            self._produce_all(messages, partial=True)
            self._bounded(what, lambda: producer.send_offsets_to_transaction(
                marker, self._group_meta, timeout))
        except KafkaException as exc:
            err = exc.args[0]
            if _fenced(err):
                self._fenced(err)
            raise self._retire(self._unavailable(what, err)) from exc
        committing = f"committing the transaction of checkpoint {seq}"
        try:
            self._retry(committing, lambda: self._bounded(
                committing, lambda: producer.commit_transaction(timeout)))
        except UnavailableError as exc:
            raise self._retire(exc) from None

    def _produce_all(self, messages: list[_Message], *, partial: bool = False) -> None:
        producer = self._live()
        topic = self.sink.topic
        half = len(messages) // 2
        for i, (key, value) in enumerate(messages):
            if partial and i == half:
                crash_point("sink.finalize.partial")
            while True:
                try:
                    producer.produce(topic, value=value, key=key)
                    break
                except BufferError:
                    producer.poll(0.05)  # the local queue is full: let deliveries drain

    def _send_acknowledged(self, messages: list[_Message]) -> None:
        """At-least-once: send and wait until the broker acknowledged every message."""
        producer = self._live()
        began, attempt = time.monotonic(), 0
        todo = messages
        while todo:
            failed: list[_Message] = []
            errors: list[Any] = []

            def report(err: Any, msg: Any, failed: list[_Message] = failed,
                       errors: list[Any] = errors) -> None:
                if err is not None:
                    failed.append((msg.key(), msg.value()))
                    errors.append(err)

            topic = self.sink.topic
            for key, value in todo:
                while True:
                    try:
                        producer.produce(topic, value=value, key=key, on_delivery=report)
                        break
                    except BufferError:
                        producer.poll(0.05)
            left = producer.flush(self.sink.op_timeout_s)
            while left:  # the idempotent producer keeps sending them; wait within the budget
                attempt += 1
                self._wait(f"waiting for {left} acknowledgements", "no answer within "
                           f"{self.sink.op_timeout_s:g} s", attempt, began)
                left = producer.flush(self.sink.op_timeout_s)
            if failed:
                err = errors[0]
                if _fenced(err) or err.fatal() or not err.retriable():
                    raise self._unavailable(f"sending {len(todo)} records", err)
                attempt += 1
                self._wait(f"sending {len(failed)} records", err, attempt, began)
            todo = failed

    def _retry(self, what: str, call: Callable[[], _T]) -> _T:
        """``call()``, retrying transient Kafka failures within the budget."""
        from confluent_kafka import KafkaException

        began, attempt = time.monotonic(), 0
        while True:
            try:
                return call()
            except KafkaException as exc:
                err = exc.args[0]
                if _fenced(err):
                    self._fenced(err)
                if err.fatal() or not (err.retriable() or _transient(err)):
                    raise self._unavailable(what, err) from exc
                attempt += 1
                self._wait(what, err, attempt, began)

    def _wait(self, what: str, err: Any, attempt: int, began: float) -> None:
        """Back off before the next attempt, or give up when the budget is spent."""
        sink = self.sink
        if attempt >= sink.retry_max_attempts or time.monotonic() - began > sink.retry_budget_s:
            raise self._unavailable(f"{what} after {attempt} attempts", err)
        delay = sink.backoff_s(attempt)
        log.warning("%r, task %s: %s failed (%s); retry %d in %.2f s", sink, self.ctx.task,
                    what, sink.redact(str(err)), attempt, delay)
        time.sleep(delay)

    def _unavailable(self, what: str, err: object) -> UnavailableError:
        return UnavailableError(
            f"{self.sink!r}, task {self.ctx.task}: {what} failed: {self.sink.redact(str(err))}; "
            "the task restarts from its checkpoint (check that the Kafka brokers run)")

    def _bounded(self, what: str, call: Callable[[], None]) -> None:
        """``call()`` on a helper thread, given up (retiring the producer) when it outlives its
        own timeout: after a broker restart librdkafka 2.16 was seen to block in
        ``send_offsets_to_transaction`` far beyond the timeout it was given (and a CI run saw a
        worker stall with no log line for 120 s after a broker restart, when only
        ``init_transactions`` and ``commit_transaction`` were left unbounded). Every
        transactional call that waits on the broker goes through here, so a hung client
        restarts the task (whose next producer's ``init_transactions`` fences this one)
        instead of stalling it."""
        outcome: list[BaseException | None] = []

        def run() -> None:
            try:
                call()
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        helper = threading.Thread(target=run, name=f"kafka-sink {what}", daemon=True)
        helper.start()
        helper.join(2 * self.sink.op_timeout_s + 1)
        if not outcome:
            raise self._retire(self._unavailable(
                what, f"no answer within {2 * self.sink.op_timeout_s + 1:g} s"))
        if outcome[0] is not None:
            raise outcome[0]

    def _retire(self, error: Exception) -> Exception:
        """Stop using this writer's producer; every later call raises ``error`` again."""
        self._producer = None
        self._gone = error
        return error

    def _fenced(self, err: KafkaError) -> None:
        raise self._retire(FencedError(
            f"{self.sink!r}: the producer of task {self.ctx.task} was fenced by a newer owner "
            f"({err.str()}); this worker no longer owns the task and must stop it"))

    def _live(self) -> Producer:
        producer = self._producer
        if producer is None:
            raise self._gone
        return producer

    def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is None:
            return
        if not self._exactly_once:
            producer.flush(self.sink.op_timeout_s)


def _transient(err: KafkaError) -> bool:
    from confluent_kafka import KafkaError as E

    return err.code() in (
        E._TRANSPORT, E._ALL_BROKERS_DOWN, E._TIMED_OUT, E.REQUEST_TIMED_OUT, E._MSG_TIMED_OUT,
        E.NOT_COORDINATOR, E.COORDINATOR_NOT_AVAILABLE, E.COORDINATOR_LOAD_IN_PROGRESS,
        E.CONCURRENT_TRANSACTIONS, E.LEADER_NOT_AVAILABLE, E.NOT_LEADER_FOR_PARTITION,
        E.NOT_ENOUGH_REPLICAS, E.NETWORK_EXCEPTION)


_pair_decoder = msgspec.json.Decoder(_RawPair)


def _decode_payload(entry: StagedEntry) -> list[_Message]:
    """The messages of a staged checkpoint, byte for byte as first encoded."""
    out: list[_Message] = []
    for line in entry.payload.splitlines():
        try:
            key, value = _pair_decoder.decode(line)
        except msgspec.DecodeError as exc:
            raise DataError(f"staged Kafka output of checkpoint {entry.seq} is corrupt ({exc}); "
                            "rewind the task with `resumeflow checkpoints rewind`") from exc
        k = bytes(key)
        out.append((None if k == b"null" else k, bytes(value)))
    return out
