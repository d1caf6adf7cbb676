"""The flow whose checkpoints are kept as golden files (do not change: old stores must match)."""

import resumeflow as rf

flow = rf.Flow("golden")
(
    flow.source(rf.sources.JsonLines("events.jsonl"))
    .key_by(lambda e: e["k"])
    .stateful_map(lambda s, e: (s + e["v"], {"id": e["id"], "sum": s + e["v"]}), initial=0)
    .sink(rf.sinks.JsonLinesSink("out.jsonl", with_key=False))
)
