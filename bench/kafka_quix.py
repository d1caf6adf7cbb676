"""Contender for bench/kafka.py: the Kafka-to-Kafka keyed running sum in Quix Streams.

Runs in its own virtual environment (bench/kafka.py makes it), exactly-once, on the broker and
topics bench/kafka.py prepares. Every record processed bumps a counter in a shared memory-mapped
file, so the driver can count records processed before a SIGKILL and after the restart.

    python kafka_quix.py BOOTSTRAP IN_TOPIC OUT_TOPIC GROUP STATE_DIR COUNTER INTERVAL_S

The run stops once no new record came for ``IDLE_S`` seconds (Quix's own ``run(timeout=...)``).
Prints one JSON line: seconds from the first record to the last, and the records this run
processed.
"""

from __future__ import annotations

import json
import mmap
import sys
import time
from typing import Any

from quixstreams import Application
from quixstreams.state import State

IDLE_S = 15.0


def main() -> None:
    bootstrap, in_topic, out_topic, group, state_dir, counter_path = sys.argv[1:7]
    interval = float(sys.argv[7])
    with open(counter_path, "r+b") as f:
        counter = mmap.mmap(f.fileno(), 8)
    seen = {"n": 0, "first": 0.0, "last": 0.0}

    app = Application(broker_address=bootstrap, consumer_group=group, auto_offset_reset="earliest",
                      processing_guarantee="exactly-once", commit_interval=interval,
                      state_dir=state_dir, loglevel="WARNING", use_changelog_topics=True,
                      consumer_extra_config={"session.timeout.ms": 6000},
                      # a stable id, so a restart fences the killed producer and aborts its
                      # open transaction at once (Quix picks a random one by default)
                      producer_extra_config={"transactional.id": f"{group}-tx"})
    source = app.topic(in_topic, value_deserializer="json", key_deserializer="str")
    sink = app.topic(out_topic, value_serializer="json", key_serializer="str")

    def running_sum(value: dict[str, Any], state: State) -> dict[str, Any]:
        now = time.perf_counter()
        if not seen["n"]:
            seen["first"] = now
        seen["n"] += 1
        seen["last"] = now
        counter[0:8] = (int.from_bytes(counter[0:8], "little") + 1).to_bytes(8, "little")
        total = state.get("sum", 0) + value["v"]
        state.set("sum", total)
        return {"key": value["key"], "value": total}

    sdf = app.dataframe(source)
    sdf = sdf.apply(running_sum, stateful=True)
    sdf.to_topic(sink)
    app.run(timeout=IDLE_S)
    print(json.dumps({"seconds": seen["last"] - seen["first"], "processed": seen["n"],
                      "first": seen["first"], "last": seen["last"]}))


if __name__ == "__main__":
    main()
