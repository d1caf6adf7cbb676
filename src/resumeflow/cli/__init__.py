"""The ``resumeflow`` command line."""

from . import _worker  # noqa: F401 - registers `resumeflow worker`
from ._main import load_flow, main

__all__ = ["load_flow", "main"]
