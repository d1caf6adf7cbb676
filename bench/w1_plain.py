"""W1 as a plain Python loop: the speed limit of a single-threaded Python pipeline."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import orjson
from _common import STARTED, report


def main(src: Path, out: Path) -> None:
    imported = time.perf_counter()
    sums: dict[str, int] = {}
    n = 0
    with open(src, "rb") as f, open(out, "wb") as sink:
        write = sink.write
        loads, dumps = orjson.loads, orjson.dumps
        for line in f:
            e = loads(line)
            k = e["key"]
            s = sums.get(k, 0) + e["v"]
            sums[k] = s
            write(dumps({"key": k, "value": s}))
            write(b"\n")
            n += 1
    report(contender="plain loop", records=n, seconds=time.perf_counter() - imported,
           import_s=imported - STARTED)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
