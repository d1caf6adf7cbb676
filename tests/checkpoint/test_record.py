"""Commit records: the digest covers every field, and any damage is a CorruptCheckpointError."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from resumeflow.checkpoint import (
    GENESIS_DIGEST,
    SCHEMA_VERSION,
    CommitRecord,
    decode_record,
    make_record,
)
from resumeflow.checkpoint._record import encode_record
from resumeflow.errors import CorruptCheckpointError


def _record(**overrides: Any) -> CommitRecord:
    fields: dict[str, Any] = {
        "task": "orders:events.jsonl:0", "epoch": 3, "seq": 7, "positions": {"0": 1234},
        "sink_txn": {"out": {"file": "out.jsonl", "base": 10, "end": 20}},
        "inflight": [], "created_at": 1700000000.5, "stats": {"records_in": 99},
        "prev_digest": "a" * 64,
    }
    fields.update(overrides)
    return make_record(**fields)


# One changed value per field of a commit record (all of them except the digest itself).
CHANGES: dict[str, Any] = {
    "task": "orders:events.jsonl:1",
    "epoch": 4,
    "seq": 8,
    "positions": {"0": 1235},
    "state_version": 6,
    "sink_txn": {"out": {"file": "out.jsonl", "base": 10, "end": 21}},
    "inflight": [{"op": "call", "key": "x"}],
    "schema_version": SCHEMA_VERSION + 1,
    "created_at": 1700000000.25,
    "stats": {"records_in": 100},
    "prev_digest": "b" * 64,
}


def test_changes_cover_every_field() -> None:
    """The table of edits below names every field but the digest (so no field goes unchecked)."""
    assert set(CHANGES) == set(CommitRecord.__struct_fields__) - {"digest"}


def test_made_record_verifies_and_round_trips() -> None:
    """A record made by ``make_record`` verifies, and decodes back to an equal record."""
    record = _record()
    record.verify()
    assert record.state_version == record.seq
    assert record.schema_version == SCHEMA_VERSION
    assert len(record.digest) == 64
    assert decode_record(encode_record(record)) == record


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_digest_covers_every_field(name: str) -> None:
    """Changing any one field, ``prev_digest`` included, makes ``verify`` fail."""
    record = _record()
    edited = msgspec.structs.replace(record, **{name: CHANGES[name]})
    with pytest.raises(CorruptCheckpointError, match="fails its digest"):
        edited.verify()


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_edited_stored_bytes_are_detected(name: str) -> None:
    """A stored record whose field was edited in its bytes is refused on decode."""
    record = _record()
    body = msgspec.json.decode(encode_record(record))
    body[name] = CHANGES[name]
    raw = msgspec.json.encode(body)
    with pytest.raises(CorruptCheckpointError):
        decode_record(raw)


def test_records_of_different_prev_digest_differ() -> None:
    """Two records equal but for ``prev_digest`` have different digests (a hash chain)."""
    first = _record(prev_digest=GENESIS_DIGEST)
    second = _record(prev_digest=first.digest)
    assert first.digest != second.digest


@pytest.mark.parametrize("raw", [
    b"",
    b"not json",
    b'{"task": "t"}',
    b'{"task": 1, "epoch": "x"}',
    b"[1, 2, 3]",
])
def test_decode_errors_are_corruption(raw: bytes) -> None:
    """Bytes that do not decode to a commit record raise ``CorruptCheckpointError``."""
    with pytest.raises(CorruptCheckpointError, match="cannot be decoded"):
        decode_record(raw)


def test_truncated_record_is_corruption() -> None:
    """Every strict prefix of a stored record is refused as corrupt, never misread."""
    raw = encode_record(_record())
    for cut in range(0, len(raw), 7):
        with pytest.raises(CorruptCheckpointError):
            decode_record(raw[:cut])


def test_newer_schema_version_is_refused_with_advice() -> None:
    """A record of a newer schema version is not misread: the error says to upgrade."""
    body = msgspec.json.decode(encode_record(_record()))
    body["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(CorruptCheckpointError, match="upgrade resumeflow"):
        decode_record(msgspec.json.encode(body))
