"""Commit records: the one durable fact that decides a checkpoint.

A commit record is written once, inside the store's atomic commit, and never changed. Its
``digest`` covers every other field including ``prev_digest``, so the records of a task form
a hash chain: a torn, truncated or edited record fails ``verify()`` and is never misread.
The digest is checked when a record is made and again whenever it is read back.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from ..errors import CorruptCheckpointError

__all__ = ["GENESIS_DIGEST", "SCHEMA_VERSION", "CommitRecord", "decode_record", "make_record"]

SCHEMA_VERSION = 1
"""Version of the commit-record and state layout written by this release."""

GENESIS_DIGEST = "0" * 64
"""``prev_digest`` of a task's first commit record."""


class CommitRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One checkpoint of one task.

    Attributes:
        task: the task id (flow, source and partition).
        epoch: fencing token of the worker that wrote it.
        seq: checkpoint number of the task, 1, 2, 3, ... without gaps.
        positions: per source partition, the position of the next record to read.
        state_version: the ``seq`` up to which keyed state deltas are included.
        sink_txn: per sink, what its pre-commit staged (finalized idempotently after commit).
        inflight: in-flight work of asynchronous operators, replayed by policy on recovery.
        schema_version: layout version of this record.
        created_at: wall-clock seconds when the record was made (for age, never for ordering).
        stats: cumulative counters carried across restarts (records in/out, dead letters,
            state keys).
        prev_digest: digest of record ``seq - 1`` (``GENESIS_DIGEST`` for seq 1 or after a
            rewind to nothing).
        digest: SHA-256 over all other fields.
    """

    task: str
    epoch: int
    seq: int
    positions: dict[str, Any]
    state_version: int
    sink_txn: dict[str, Any]
    inflight: list[Any]
    schema_version: int
    created_at: float
    stats: dict[str, int]
    prev_digest: str
    digest: str

    def verify(self) -> None:
        """Raise ``CorruptCheckpointError`` unless the digest matches the content."""
        expected = _digest_of(self)
        if expected != self.digest:
            raise CorruptCheckpointError(
                f"commit record seq {self.seq} of task {self.task!r} fails its digest "
                f"(stored {self.digest[:12]}…, computed {expected[:12]}…)"
            )


_body_encoder = msgspec.json.Encoder(order="sorted")


def _digest_of(record: CommitRecord) -> str:
    body = msgspec.structs.asdict(record)
    del body["digest"]
    return hashlib.sha256(_body_encoder.encode(body)).hexdigest()


def make_record(
    *,
    task: str,
    epoch: int,
    seq: int,
    positions: dict[str, Any],
    sink_txn: dict[str, Any],
    inflight: list[Any],
    created_at: float,
    stats: dict[str, int],
    prev_digest: str,
) -> CommitRecord:
    """Build a commit record with its digest, and check the digest on the way out."""
    draft = CommitRecord(
        task=task,
        epoch=epoch,
        seq=seq,
        positions=positions,
        state_version=seq,
        sink_txn=sink_txn,
        inflight=inflight,
        schema_version=SCHEMA_VERSION,
        created_at=created_at,
        stats=stats,
        prev_digest=prev_digest,
        digest="",
    )
    record = msgspec.structs.replace(draft, digest=_digest_of(draft))
    record.verify()
    return record


_record_decoder = msgspec.json.Decoder(CommitRecord)


def encode_record(record: CommitRecord) -> bytes:
    """Encode a record for storage."""
    return _body_encoder.encode(record)


def decode_record(data: bytes) -> CommitRecord:
    """Decode and verify a stored record. A decoder error is corruption, like a bad digest."""
    try:
        record = _record_decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        # msgspec raises UnicodeDecodeError, not DecodeError, for invalid UTF-8 in a string.
        raise CorruptCheckpointError(f"commit record cannot be decoded: {exc}") from exc
    if record.schema_version > SCHEMA_VERSION:
        raise CorruptCheckpointError(
            f"commit record seq {record.seq} has schema version {record.schema_version}, newer "
            f"than this resumeflow ({SCHEMA_VERSION}); upgrade resumeflow to read it"
        )
    record.verify()
    return record
