"""Contender for bench/kafka.py: the Kafka-to-Kafka keyed running sum on resumeflow.

Exactly-once: ``KafkaSource`` (one task per partition, the consumer group's assignment) into an
exactly-once ``KafkaSink`` (staged in the store, published in one Kafka transaction per
checkpoint), on the embedded SQLite store (or PostgreSQL when STORE is a PostgreSQL DSN, for several
workers) at the default commit bound (100 ms / 100,000
records). Every record processed bumps a counter in a shared memory-mapped file, so the driver
can count records processed before a SIGKILL and after the restart. The run stops once no new
record came for ``IDLE_S`` seconds (a thread asks the runtime to stop: it commits and returns).

    python kafka_rf.py BOOTSTRAP IN_TOPIC OUT_TOPIC GROUP STORE COUNTER [SINK_DELAY_S]

``SINK_DELAY_S`` makes the sink wait that long per record before publishing, over one
connection per worker (a sink that waits on I/O, for the scale-out figure). Prints one JSON
line: seconds from the first record to the last, and the records this run processed.
"""

from __future__ import annotations

import json
import mmap
import sys
import threading
import time
from typing import Any

import resumeflow as rf
from resumeflow.sinks import KafkaSink
from resumeflow.sources import KafkaSource

IDLE_S = 3.0
SLOW_IDLE_S = 20.0
"""With the slow sink, one publication of a full window can hold the task thread this long."""


_IO = threading.Lock()
"""The worker's one connection to the slow downstream system: its writes take turns."""


class SlowKafkaSink(KafkaSink):
    """A Kafka sink whose every publication first waits on outside I/O: ``delay_s`` per
    record, over one connection per worker process (a lock), as a sink writing to a service
    with a fixed per-record latency would."""

    def __init__(self, *args: Any, delay_s: float, published: mmap.mmap,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.delay_s = delay_s
        self.published = published

    def open(self, ctx: Any) -> Any:
        writer = super().open(ctx)
        precommit, finalize = writer.precommit, writer.finalize
        sizes: dict[int, int] = {}
        delay, published = self.delay_s, self.published

        def counted_precommit(seq: int) -> Any:
            sizes[seq] = len(writer.buffer)
            return precommit(seq)

        def slow_finalize(seq: int) -> None:
            n = sizes.pop(seq, 0)
            with _IO:
                time.sleep(delay * n)
            finalize(seq)
            with _IO:  # records now published (the driver's measure of the sink's rate)
                done = int.from_bytes(published[8:16], "little") + n
                published[8:16] = done.to_bytes(8, "little")

        writer.precommit = counted_precommit
        writer.finalize = slow_finalize
        return writer


def main() -> None:
    bootstrap, in_topic, out_topic, group, store, counter_path = sys.argv[1:7]
    delay_s = float(sys.argv[7]) if len(sys.argv) > 7 else 0.0
    with open(counter_path, "r+b") as f:
        counter = mmap.mmap(f.fileno(), 16)
    seen = {"n": 0, "first": 0.0, "last": 0.0}

    def count(event: dict[str, Any]) -> dict[str, Any]:
        now = time.perf_counter()
        if not seen["n"]:
            seen["first"] = now
        seen["n"] += 1
        seen["last"] = now
        counter[0:8] = (int.from_bytes(counter[0:8], "little") + 1).to_bytes(8, "little")
        return event

    sink = SlowKafkaSink(out_topic, bootstrap=bootstrap, delay_s=delay_s, published=counter) \
        if delay_s \
        else KafkaSink(out_topic, bootstrap=bootstrap)
    flow = rf.Flow("kbench")
    (flow.source(KafkaSource(in_topic, bootstrap=bootstrap, group_id=group,
                             config={"session.timeout.ms": 6000}))
         .map(count)
         .key_by(lambda e: e["key"])
         .reduce(lambda total, e: total + e["v"], initial=0)
         .sink(sink))
    if store.startswith(("postgresql://", "postgres://")) or "dbname=" in store:
        from resumeflow.checkpoint import PostgresStore

        runtime = rf.Runtime(flow, PostgresStore(store), rf.RunConfig(
            follow=True, dead_letter_path=f"{counter_path}.deadletters/{{partition}}.jsonl"))
    else:
        runtime = rf.Runtime(flow, store, rf.RunConfig(follow=True))

    def watchdog() -> None:
        """Stop once neither processing nor publishing moved for ``IDLE_S`` (a slow sink may
        hold the task thread longer than that while a big window is published)."""
        began = time.perf_counter()
        idle_s = SLOW_IDLE_S if delay_s else IDLE_S
        last_progress, moved_at = -1, began
        while True:
            time.sleep(0.25)
            now = time.perf_counter()
            progress = seen["n"] + int.from_bytes(counter[8:16], "little")
            if progress != last_progress:
                last_progress, moved_at = progress, now
            if now - moved_at > idle_s and (seen["n"] or now - began > 60):
                runtime.stop("idle")
                return

    threading.Thread(target=watchdog, daemon=True).start()
    runtime.run()
    print(json.dumps({"seconds": seen["last"] - seen["first"], "processed": seen["n"],
                      "first": seen["first"], "last": seen["last"]}))


if __name__ == "__main__":
    main()
