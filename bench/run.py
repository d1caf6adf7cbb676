"""Benchmark driver: W1 throughput of resumeflow against a plain loop and Bytewax, in one run.

Every contender runs in its own interpreter on the same input; contenders alternate and each
round repeats them all, so noise on this shared machine hits all of them alike. The driver
prints medians and ratios and writes docs/benchmarks.md.

    python bench/run.py            # 2,000,000 records, 3 rounds
    python bench/run.py --quick    # 200,000 records, 1 round (development)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = HERE / ".data"

CONTENDERS: list[tuple[str, list[str]]] = [
    ("plain", ["w1_plain.py", "{src}", "{out}"]),
    ("rf-default", ["w1_resumeflow.py", "{src}", "{out}", "default"]),
    ("rf-off", ["w1_resumeflow.py", "{src}", "{out}", "off"]),
    ("bytewax-100ms", ["w1_bytewax.py", "{src}", "{out}", "0.1"]),
    ("bytewax-10s", ["w1_bytewax.py", "{src}", "{out}", "10"]),
    ("bytewax-none", ["w1_bytewax.py", "{src}", "{out}", "none"]),
]


def _ensure_bytewax() -> bool:
    try:
        import bytewax  # noqa: F401
    except ImportError:
        print("installing bytewax==0.21.1 for the benchmark only", flush=True)
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "bytewax==0.21.1"],
                              check=False)
        return done.returncode == 0
    return True


def _run(name: str, args: list[str], src: Path) -> dict[str, object]:
    work = DATA / name
    work.mkdir(parents=True, exist_ok=True)
    out = work / "out.jsonl"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, *[a.format(src=src, out=out) for a in args]]
    began = time.perf_counter()
    done = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(HERE)})
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = wall
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="200k records, one round")
    parser.add_argument("--records", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--no-write", action="store_true", help="do not write docs/benchmarks.md")
    opts = parser.parse_args()
    records = opts.records or (200_000 if opts.quick else 2_000_000)
    rounds = opts.rounds or (1 if opts.quick else 3)
    sys.path.insert(0, str(HERE))
    from _common import make_w1

    src = make_w1(DATA / f"w1-{records}.jsonl", records)
    contenders = CONTENDERS if _ensure_bytewax() else \
        [c for c in CONTENDERS if not c[0].startswith("bytewax")]
    results: dict[str, list[dict[str, object]]] = {name: [] for name, _ in contenders}
    for round_no in range(rounds):
        order = contenders if round_no % 2 == 0 else list(reversed(contenders))
        for name, args in order:
            r = _run(name, args, src)
            results[name].append(r)
            print(f"round {round_no + 1}/{rounds} {name:14s} {float(r['seconds']):7.2f} s  "  # type: ignore[arg-type]
                  f"{records / float(r['seconds']):>10,.0f} rec/s", flush=True)  # type: ignore[arg-type]
    table = _summarize(results, records)
    print(table)
    if not opts.no_write:
        _write(table, records, rounds, opts)


def _median(rs: list[dict[str, object]], field: str) -> float:
    return statistics.median(float(r[field]) for r in rs)  # type: ignore[arg-type]


def _summarize(results: dict[str, list[dict[str, object]]], records: int) -> str:
    med = {name: _median(rs, "seconds") for name, rs in results.items() if rs}
    mem = {name: _median(rs, "maxrss_mb") for name, rs in results.items() if rs}
    rate = {name: records / s for name, s in med.items()}
    lines = ["| contender | median s | records/s | peak RSS MB |", "|---|---:|---:|---:|"]
    for name, rs in results.items():
        if rs:
            label = str(rs[0]["contender"])
            lines.append(f"| {label} | {med[name]:.2f} | {rate[name]:,.0f} | {mem[name]:.0f} |")
    lines += ["", "| ratio | value | goal |", "|---|---:|---:|"]

    def ratio(label: str, a: str, b: str, goal: str) -> None:
        if a in rate and b in rate:
            lines.append(f"| {label} | {rate[a] / rate[b]:.2f} | {goal} |")

    ratio("resumeflow ÷ plain loop", "rf-default", "plain", "≥ 0.5")
    ratio("resumeflow ÷ Bytewax, 100 ms snapshots", "rf-default", "bytewax-100ms", "≥ 5")
    ratio("resumeflow ÷ Bytewax, 10 s snapshots", "rf-default", "bytewax-10s", "-")
    ratio("resumeflow ÷ Bytewax, no recovery", "rf-default", "bytewax-none", "≥ 2")
    ratio("resumeflow 100 ms commits ÷ commits disabled", "rf-default", "rf-off", "≥ 0.97")
    return "\n".join(lines)


def _write(table: str, records: int, rounds: int, opts: argparse.Namespace) -> None:
    command = "python bench/run.py" + (" --quick" if opts.quick else "")
    text = f"""# Benchmarks

Written by `{command}` (`make bench`; `make bench-quick` for the short run).
Machine: {os.cpu_count()} cores, Python {platform.python_version()}, {platform.machine()};
{time.strftime('%Y-%m-%d')}. These machines are shared and noisy: figures are medians of
{rounds} round(s) with contenders alternating, and the ratios are what to compare.

## W1: {records:,} JSON lines, keyed running sum, every update written (exactly-once)

Seconds are processing time inside each contender's process, from after its imports to its
end; interpreter start-up is not included.

{table}
"""
    (ROOT / "docs").mkdir(exist_ok=True)
    (ROOT / "docs" / "benchmarks.md").write_text(text)
    print(f"wrote {ROOT / 'docs' / 'benchmarks.md'}")


if __name__ == "__main__":
    main()
