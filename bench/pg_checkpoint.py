"""PostgresStore: checkpoint cost with 1,000 dirty keys in a 1,000,000-key state, and the cost
of resuming (open_task, first cold reads), on a private PostgreSQL server.

    python bench/pg_checkpoint.py [--keys 1000000] [--dirty 1000] [--commits 100]

Prints p50, p99 and max of the commits (the store's commit alone: one transaction with the
epoch check, the delta, the record), open_task and three cold reads. Needs the postgres extra
and Debian's PostgreSQL binaries (see resumeflow.testing._pg_server).
"""

from __future__ import annotations

import argparse
import time

from resumeflow.checkpoint import GENESIS_DIGEST, CommitRecord, OpenedTask, make_record
from resumeflow.checkpoint._postgres import PostgresStore
from resumeflow.testing._pg_server import PostgresServer


def _record(opened: OpenedTask, seq: int, prev: CommitRecord | None) -> CommitRecord:
    return make_record(task=opened.task, epoch=opened.epoch, seq=seq, positions={"0": seq},
                       sink_txn={}, inflight=[], created_at=time.time(), stats={},
                       prev_digest=prev.digest if prev else GENESIS_DIGEST)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--dirty", type=int, default=1000)
    parser.add_argument("--commits", type=int, default=100)
    args = parser.parse_args()
    with PostgresServer() as server:
        store = PostgresStore(server.dsn, keep_checkpoints=10)
        opened = store.open_task("bench:src:0")
        prev: CommitRecord | None = None
        began = time.perf_counter()
        chunk = max(1, args.keys // 10)
        for seq, start in enumerate(range(0, args.keys, chunk), start=1):
            prev = _record(opened, seq, prev)
            store.commit(opened, prev, [(b"k%08d" % i, b"0")
                                        for i in range(start, min(args.keys, start + chunk))],
                         [], [])
        store.wait_pruned()
        print(f"state of {args.keys:,} keys written in {time.perf_counter() - began:.1f} s")
        spent = []
        assert prev is not None
        for seq in range(prev.seq + 1, prev.seq + 1 + args.commits):
            prev = _record(opened, seq, prev)
            dirty: list[tuple[bytes, bytes | None]] = [
                (b"k%08d" % ((seq * 7919 + i * 997) % args.keys), str(seq).encode())
                for i in range(args.dirty)]
            began = time.perf_counter()
            store.commit(opened, prev, dirty, [], [])
            spent.append(time.perf_counter() - began)
        spent.sort()
        p = lambda q: spent[min(len(spent) - 1, int(q * len(spent)))] * 1e3  # noqa: E731
        print(f"commit of {args.dirty:,} dirty keys in {args.keys:,}: p50 {p(0.5):.1f} ms, "
              f"p99 {p(0.99):.1f} ms, max {spent[-1] * 1e3:.1f} ms ({args.commits} commits)")
        store.close()
        resumed = PostgresStore(server.dsn, keep_checkpoints=10)
        began = time.perf_counter()
        again = resumed.open_task("bench:src:0")
        print(f"open_task {(time.perf_counter() - began) * 1e3:.1f} ms")
        for n, key in enumerate((b"k%08d" % 123_456, b"k%08d" % 654_321, b"k%08d" % 999_999)):
            began = time.perf_counter()
            resumed.load_state(again.task_no, key)
            note = " (opens the read connection)" if n == 0 else ""
            print(f"cold read {(time.perf_counter() - began) * 1e3:.2f} ms{note}")
        resumed.close()


if __name__ == "__main__":
    main()
