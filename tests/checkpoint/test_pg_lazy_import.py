"""The PostgreSQL connectors are imported lazily: resumeflow works without the extra."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_BLOCKED = """
import sys
sys.modules["psycopg"] = None  # as if the postgres extra were not installed
import resumeflow, resumeflow.checkpoint, resumeflow.sinks, resumeflow.testing
assert "resumeflow.checkpoint._postgres" not in sys.modules
for module, name in ((resumeflow.checkpoint, "PostgresStore"), (resumeflow.sinks, "PostgresTable")):
    try:
        getattr(module, name)
    except ImportError as exc:
        assert "pip install 'resumeflow[postgres]'" in str(exc), exc
    else:
        raise AssertionError(name + " imported without psycopg")
print("ok")
"""


def test_import_resumeflow_without_psycopg() -> None:
    """Without psycopg, resumeflow imports and the PostgreSQL names say which extra to add."""
    done = subprocess.run([sys.executable, "-c", _BLOCKED], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_postgres_names_are_lazy_exports() -> None:
    """PostgresStore and PostgresTable resolve from their packages on first use."""
    if os.environ.get("CI") != "true":
        pytest.importorskip("psycopg", reason="the postgres extra is not installed")
    import resumeflow as rf

    assert rf.checkpoint.PostgresStore.__module__ == "resumeflow.checkpoint._postgres"
    assert rf.sinks.PostgresTable.__module__ == "resumeflow.sinks._postgres"
