"""The ``resumeflow`` command line."""

from ._main import load_flow, main

__all__ = ["load_flow", "main"]
