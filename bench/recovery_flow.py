"""The W1 flow as ``FILE.py:ATTR`` for ``resumeflow run`` and ``resumeflow chaos``.

``resumeflow run bench/recovery_flow.py:flow`` with ``RF_BENCH_SRC`` (input JSON lines) and
``RF_BENCH_OUT`` (output JSON lines) in the environment: the flow of ``w1_resumeflow.build``.
"""

from __future__ import annotations

import os
from pathlib import Path

from w1_resumeflow import build

import resumeflow as rf


def flow() -> rf.Flow:
    return build(Path(os.environ["RF_BENCH_SRC"]),
                 rf.sinks.JsonLinesSink(Path(os.environ["RF_BENCH_OUT"])))
