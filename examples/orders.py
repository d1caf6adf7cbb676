"""Running total per customer over a file of orders, exactly once.

Input: ``$RESUMEFLOW_DEMO_DIR/orders.jsonl`` (default ``demo-data/``), one order per line::

    {"id": 17, "customer": "c042", "amount": 1250, "status": "paid"}

Output: ``$RESUMEFLOW_DEMO_DIR/totals.jsonl``, one line per paid order, in input order::

    {"id": 17, "customer": "c042", "total": 98120}

``total`` is the customer's running total (in cents) up to and including that order. Run it::

    resumeflow run examples/orders.py:flow --store demo-data/store.db

Kill it at any moment and run the same command again: it resumes from its last checkpoint, and
``totals.jsonl`` ends up with every paid order exactly once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import resumeflow as rf

DATA_DIR = Path(os.environ.get("RESUMEFLOW_DEMO_DIR", "demo-data"))
ORDERS = DATA_DIR / "orders.jsonl"
TOTALS = DATA_DIR / "totals.jsonl"

Order = dict[str, Any]


def running_total(total: int, order: Order) -> tuple[int, Order]:
    """Add one order to its customer's total; emit the order with the new total.

    Return a new state rather than changing it in place: a record retried after an error in
    user code must not be counted twice.
    """
    total += order["amount"]
    return total, {"id": order["id"], "customer": order["customer"], "total": total}


flow = rf.Flow("orders")  # the flow name is part of every checkpoint's id: keep it stable
(
    flow.source(rf.sources.JsonLines(ORDERS))  # one task; position = byte offset in the file
    .filter(lambda order: order["status"] == "paid")  # refunds and the like do not count
    .key_by(lambda order: order["customer"])  # state and ordering per customer
    .stateful_map(running_total, initial=0, name="totals")  # keyed state, checkpointed
    .sink(rf.sinks.JsonLinesSink(TOTALS, with_key=False))  # staged, then appended once
)


if __name__ == "__main__":
    # The same flow from Python instead of the CLI: run until the input ends, then commit.
    summary = rf.run(flow, DATA_DIR / "store.db", rf.RunConfig(replay_max_events=50_000))
    print(f"{summary.records_in} orders read, {summary.commits} commits, "
          f"{summary.records_replayed} replayed")
