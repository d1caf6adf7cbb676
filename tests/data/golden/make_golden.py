"""Write the golden store of the current schema version into ``v<N>/``.

Run only when SCHEMA_VERSION changes, to add the new version's directory; never rewrite an
existing one: the point of the golden files is that every later version restores them.

    python tests/data/golden/make_golden.py
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

from resumeflow.checkpoint import SCHEMA_VERSION

HERE = Path(__file__).resolve().parent


def main() -> None:
    target = HERE / f"v{SCHEMA_VERSION}"
    if target.exists():
        sys.exit(f"{target} exists; golden files are never rewritten")
    target.mkdir()
    shutil.copy(HERE / "flow.py", target / "flow.py")
    with open(target / "events.jsonl", "w") as f:
        for i in range(3000):
            f.write(json.dumps({"id": i, "k": f"k{i % 37}", "v": i % 11}) + "\n")
    env = {**os.environ, "RESUMEFLOW_CRASH_AT": "commit.after_store:3"}
    cmd = [sys.executable, "-m", "resumeflow.cli", "run", "flow.py:flow", "--store", "store.db",
           "--replay-max-events", "500", "--no-progress"]
    crashed = subprocess.run(cmd, cwd=target, env=env, check=False)
    assert crashed.returncode == -9, crashed.returncode
    db = sqlite3.connect(target / "store.db")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    for leftover in ("store.db-wal", "store.db-shm", "store.db.progress"):
        (target / leftover).unlink(missing_ok=True)
    shutil.rmtree(target / "store.db.deadletters", ignore_errors=True)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
