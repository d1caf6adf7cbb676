"""Safe encoding of keys, state values, records and commit records.

Everything resumeflow writes to a store or a file goes through JSON (msgspec): nothing read
back is ever unpickled. A value that JSON cannot represent fails when it is written, never
when it is read. Tuples come back as lists; use lists or scalars in state to keep hot and
cold values identical.
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ["decode", "decode_line", "encode", "encode_key"]

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()

encode = _encoder.encode
"""Encode a JSON-compatible value to bytes; raises ``TypeError`` otherwise."""


def encode_key(key: Any) -> bytes:
    """Encode a state key; equal keys of one type give equal bytes."""
    return _encoder.encode(key)


def decode(data: bytes | memoryview | str) -> Any:
    """Decode JSON bytes; raises ``msgspec.DecodeError`` on malformed input."""
    return _decoder.decode(data)


decode_line = _decoder.decode
