"""Flows: describe a pipeline once; the runtime compiles it per task."""

from ._compile import build_chain, rollback
from ._flow import Flow, Operator, Stream

__all__ = ["Flow", "Operator", "Stream", "build_chain", "rollback"]
