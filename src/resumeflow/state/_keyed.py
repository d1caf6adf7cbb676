"""Keyed state of one task: hot keys in memory, cold keys in the store, loaded on first touch.

Guarantees: a key's value is read from the store at most once while it stays hot; a
checkpoint writes only the keys changed since the previous one (``take_delta``); clean keys
are evicted when the hot set grows past ``max_hot_keys``, dirty keys never are. Opening the
state reads nothing. Between ``take_delta`` and ``settle`` (while that checkpoint is being
written) the store may not show the delta yet: keys it deletes read as absent without
asking the store, and nothing is evicted.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from itertools import chain, repeat
from typing import Any

from .._codec import decode, encode, encode_key
from ..errors import CorruptCheckpointError, ResumeflowError, UnavailableError

_encode = encode
_first = operator.itemgetter(0)
_second = operator.itemgetter(1)

__all__ = ["MISSING", "KeyedState"]


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()
"""Marker for a key that has no value (distinct from a stored ``None``)."""


class KeyedState:
    """Hot cache over a task's committed state.

    Args:
        load: reads one encoded key's committed value (``None`` when absent).
        namespace: prefix of this state's keys in the store (the operator's state name).
        known_empty: the store holds no value of this state (a new task, or a checkpoint
            that counted zero keys): cold reads are skipped until a key is evicted.
        max_hot_keys: clean keys beyond this are evicted at ``evict()``; ``math.inf`` keeps all.
        keys_committed: number of keys with a value at the last checkpoint.
    """

    __slots__ = ("_cold", "_last", "_load", "_prefix", "_unsettled", "dirty", "keys", "loads",
                 "max_hot_keys", "values")

    def __init__(self, load: Callable[[bytes], bytes | None], *, max_hot_keys: float,
                 keys_committed: int = 0, namespace: str = "",
                 known_empty: bool = False) -> None:
        self._load = load
        self._prefix = namespace.encode() + b"\x00" if namespace else b""
        self.values: dict[Any, Any] = {}
        self.dirty: set[Any] = set()
        self.max_hot_keys = max_hot_keys
        self.keys = keys_committed
        """Keys that have a value, counting changes not yet committed."""
        self._cold = not known_empty
        """Whether the store may hold a value this cache does not: not while the state was
        empty at open and nothing has been evicted (building state then reads nothing)."""
        self.loads = 0
        """Cold reads from the store since the state opened."""
        self._unsettled: set[Any] = set()
        """Keys deleted by a delta taken but not yet settled (durable in the store)."""
        self._last: dict[Any, bytes] = {}
        """The keys of the last delta taken, each with its encoding (namespace included), in
        the order of those encodings: the next delta reuses both for the keys it shares."""

    def load(self, key: Any) -> Any:
        """Committed value of a key that is not hot, or ``MISSING``; caches it.

        A key that is dirty but not hot was deleted since the last checkpoint.
        """
        if not self._cold or key in self.dirty or key in self._unsettled:
            return MISSING
        self.loads += 1
        try:
            raw = self._load(self._prefix + encode_key(key))
        except ResumeflowError:
            raise
        except Exception as exc:
            raise UnavailableError(
                f"reading the state of key {key!r} failed: {exc}; the task restarts from its "
                "last checkpoint"
            ) from exc
        if raw is None:
            return MISSING
        try:
            value = decode(raw)
        except Exception as exc:
            raise CorruptCheckpointError(
                f"stored state of key {key!r} cannot be decoded ({exc}); restore the store or "
                "rewind the task"
            ) from exc
        self.values[key] = value
        return value

    def get(self, key: Any) -> Any:
        """Current value of ``key`` or ``MISSING``."""
        value = self.values.get(key, MISSING)
        if value is MISSING:
            value = self.load(key)
        return value

    def set(self, key: Any, value: Any, *, existed: bool) -> None:
        """Give ``key`` a value (``MISSING`` deletes it); ``existed`` says if it had one."""
        if value is MISSING:
            if existed:
                self.keys -= 1
            self.values.pop(key, None)
        else:
            if not existed:
                self.keys += 1
            self.values[key] = value
        self.dirty.add(key)

    def take_delta(self) -> list[tuple[bytes, bytes | None]]:
        """Encode and clear the dirty keys, sorted by their encoding (the order a store
        pages them in); deleted keys become tombstones (``None``).

        Keys the last delta also changed keep the encoding and the place it gave them, so a
        checkpoint that changes the same keys again (a small hot state: W1's 10,000 keys in
        every window) neither encodes nor sorts its keys: only the keys new to it are
        encoded and sorted, then merged into the order kept (two sorted runs, one linear
        pass of the sort)."""
        dirty = self.dirty
        last = self._last
        if dirty == last.keys():
            order = list(last)
            keys = list(last.values())
        else:
            prefix = self._prefix
            new = list(dirty.difference(last)) if last else list(dirty)
            encoded = map(_encode, new)
            new_keys = [prefix + k for k in encoded] if prefix else list(encoded)
            if last and len(new) < len(dirty):
                kept = list(filter(dirty.__contains__, last))
                pairs = sorted(chain(zip(map(last.__getitem__, kept), kept, strict=True),
                                     zip(new_keys, new, strict=True)), key=_first)
            else:
                pairs = sorted(zip(new_keys, new, strict=True), key=_first)
            keys = list(map(_first, pairs))
            order = list(map(_second, pairs))
            self._last = dict(zip(order, keys, strict=True))
        dirty.clear()
        # map() over C callables, not comprehensions: no Python frame per key (about a
        # tenth of a 10,000-key delta).
        olds = list(map(self.values.get, order, repeat(MISSING)))
        if MISSING not in olds:  # no deletion: encode every value in one pass
            return list(zip(keys, map(_encode, olds), strict=True))
        if self._cold:
            self._unsettled.update(k for k, v in zip(order, olds, strict=True) if v is MISSING)
        return [(kb, None if v is MISSING else _encode(v)) for kb, v in zip(keys, olds,
                                                                           strict=True)]

    def settle(self) -> None:
        """The last delta taken is durable in the store: cold reads may see it from now."""
        self._unsettled.clear()

    def evict(self) -> int:
        """Drop the oldest clean keys past ``max_hot_keys``; returns how many were dropped.
        Only call it when every delta taken is settled: an evicted key is read back from the
        store."""
        excess = len(self.values) - self.max_hot_keys
        if excess <= 0:
            return 0
        target = int(excess + self.max_hot_keys // 5)
        dropped = 0
        dirty = self.dirty
        for key in list(self.values):
            if dropped >= target:
                break
            if key not in dirty:
                del self.values[key]
                dropped += 1
        if dropped:
            self._cold = True
        return dropped
