"""Keyed state: a hot in-memory cache with a dirty set over cold, committed state."""

from ._keyed import MISSING, KeyedState

__all__ = ["MISSING", "KeyedState"]
