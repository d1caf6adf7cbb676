"""JsonLinesSink: staged per checkpoint, finalized idempotently, cut back on recovery."""

from __future__ import annotations

import io
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from resumeflow._faults import installed
from resumeflow.errors import ConfigurationError, DataError
from resumeflow.sinks import JsonLinesSink, SinkContext, Stdout


def ctx(*, keyed: bool = True, guarantee: Any = "exactly-once", partition: str = "0",
        partitions: int = 1) -> SinkContext:
    return SinkContext(sink_id="out", task=f"f:s:{partition}", partition=partition,
                       partitions=partitions, keyed=keyed, guarantee=guarantee,
                       store_path=None)


def lines(path: Path) -> list[Any]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


class Crash(BaseException):
    """Stands for the process dying at a crash point."""


def crash_at(name: str) -> Any:
    def hook(point: str) -> None:
        if point == name:
            raise Crash(point)
    return hook


def test_output_is_invisible_until_finalize(tmp_path: Path) -> None:
    """Pre-commit stages the buffer; the file changes only at finalize."""
    out = tmp_path / "out.jsonl"
    w = JsonLinesSink(out).open(ctx())
    w.buffer.extend([("a", 1), ("b", 2)])
    pre = w.precommit(1)
    assert out.read_bytes() == b""
    assert pre.staged is not None and pre.meta is not None
    assert pre.meta["file"] == str(out) and pre.meta["base"] == 0
    assert pre.meta["end"] == len(pre.staged.payload) > 0
    assert w.buffer == []
    w.finalize(1)
    assert lines(out) == [{"key": "a", "value": 1}, {"key": "b", "value": 2}]
    w.close()


def test_output_staged_in_the_store_is_released_only_once_fsynced(tmp_path: Path) -> None:
    """Small checkpoints' appends share one fsync per SYNC_EVERY checkpoints: until then
    ``releasable()`` does not name them, so the store keeps their staged output."""
    from resumeflow.sinks._jsonlines import SYNC_EVERY

    out = tmp_path / "out.jsonl"
    w = JsonLinesSink(out).open(ctx())
    for seq in range(1, SYNC_EVERY):
        w.buffer.append(("a", seq))
        w.precommit(seq)
        w.finalize(seq)
        assert w.releasable() is None
    w.buffer.append(("a", SYNC_EVERY))
    w.precommit(SYNC_EVERY)
    w.finalize(SYNC_EVERY)
    deadline = time.monotonic() + 10
    while w.releasable() != SYNC_EVERY and time.monotonic() < deadline:
        time.sleep(0.001)
    assert w.releasable() == SYNC_EVERY
    assert len(lines(out)) == SYNC_EVERY
    w.close()


def test_the_shared_fsync_runs_off_the_commit_path_and_close_waits_for_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fsync shared by SYNC_EVERY store-staged checkpoints runs on a helper thread: the
    finalize that starts it returns while it is still running, ``releasable()`` names those
    checkpoints only once it is done, and close() waits for it."""
    from resumeflow.sinks import _jsonlines

    release = threading.Event()
    started = threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        started.set()
        assert release.wait(10)
        real_fsync(fd)

    out = tmp_path / "out.jsonl"
    w = JsonLinesSink(out).open(ctx())
    monkeypatch.setattr(_jsonlines.os, "fsync", slow_fsync)
    for seq in range(1, _jsonlines.SYNC_EVERY + 1):
        w.buffer.append(("a", seq))
        w.precommit(seq)
        w.finalize(seq)
    assert started.wait(10)
    assert w.releasable() is None  # the fsync has not finished
    w.buffer.append(("a", 99))
    w.precommit(_jsonlines.SYNC_EVERY + 1)
    w.finalize(_jsonlines.SYNC_EVERY + 1)  # does not wait for the fsync in flight
    assert w.releasable() is None
    release.set()
    w.close()
    assert w.releasable() == _jsonlines.SYNC_EVERY + 1
    assert len(lines(out)) == _jsonlines.SYNC_EVERY + 1


def test_a_failed_background_fsync_fails_the_next_finalize(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An fsync error on the helper thread is not lost: the next finalize raises it, naming
    the file, and ``releasable()`` never names the checkpoints it should have made durable."""
    from resumeflow.sinks import _jsonlines

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    out = tmp_path / "out.jsonl"
    w = JsonLinesSink(out).open(ctx())
    monkeypatch.setattr(_jsonlines.os, "fsync", failing_fsync)
    for seq in range(1, _jsonlines.SYNC_EVERY + 1):
        w.buffer.append(("a", seq))
        w.precommit(seq)
        w.finalize(seq)
    syncing = w._syncing
    assert syncing is not None
    syncing.join(10)
    w.buffer.append(("a", 99))
    w.precommit(_jsonlines.SYNC_EVERY + 1)
    with pytest.raises(DataError, match="fsync of output file"):
        w.finalize(_jsonlines.SYNC_EVERY + 1)
    assert w.releasable() is None
    monkeypatch.undo()
    w.close()


def test_small_output_is_staged_in_the_store_and_large_output_in_a_staging_file(
        tmp_path: Path) -> None:
    """Output up to INLINE_STAGING_MAX bytes rides in the staged entry (no staging file);
    larger output is written to the staging file, which the entry and the meta name."""
    from resumeflow.sinks._jsonlines import INLINE_STAGING_MAX

    out = tmp_path / "out.jsonl"
    w = JsonLinesSink(out).open(ctx())
    w.buffer.append(("a", 1))
    small = w.precommit(1)
    assert small.staged is not None and small.staged.payload == b'{"key":"a","value":1}\n'
    assert not list(tmp_path.glob("*.rf-staging-*"))
    w.finalize(1)
    w.buffer.extend(("k", "x" * 100) for _ in range(INLINE_STAGING_MAX // 100 + 1))
    large = w.precommit(2)
    assert large.staged is not None and large.staged.payload == b""
    assert large.meta is not None and large.meta["stage_len"] == large.meta["end"] - \
        large.meta["base"] > INLINE_STAGING_MAX
    (staging,) = tmp_path.glob("*.rf-staging-*")
    assert staging.stat().st_size == large.meta["stage_len"]
    w.finalize(2)
    assert len(lines(out)) == 2 + INLINE_STAGING_MAX // 100
    w.close()


def test_output_staged_in_a_file_stays_there_until_the_output_file_is_fsynced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finalizing file-staged output appends it and fsyncs the file in the background: until
    that fsync is done the staging file keeps it (the next checkpoint stages after it) and
    ``releasable()`` does not name it, so appends lost before the fsync are redone from the
    staging file; once it is done the staging file starts again from its beginning."""
    from resumeflow.sinks import _jsonlines

    out = tmp_path / "out.jsonl"
    w = JsonLinesSink(out).open(ctx())
    release = threading.Event()
    real_fsync = os.fsync

    def gated_fsync(fd: int) -> None:
        if fd == w._file.fileno():
            assert release.wait(10)
        real_fsync(fd)

    monkeypatch.setattr(_jsonlines.os, "fsync", gated_fsync)
    big = _jsonlines.INLINE_STAGING_MAX // 100 + 1

    def checkpoint(seq: int) -> Any:
        w.buffer.extend((f"k{seq}", "x" * 100) for _ in range(big))
        pre = w.precommit(seq)
        assert pre.meta is not None and "staging" in pre.meta
        w.finalize(seq)  # returns with the output file's fsync still running
        return pre

    first, second = checkpoint(1), checkpoint(2)
    assert w.releasable() is None
    assert first.meta["stage_off"] == 0
    assert second.meta["stage_off"] == first.meta["stage_len"]  # after, not over, 1's
    # Had both appends been lost before the fsync, recovery would redo both from staging.
    lost = tmp_path / "lost.jsonl"
    lost.touch()
    redo = JsonLinesSink(lost).open(ctx())
    redo.recover(second.meta, [first.staged, second.staged])
    redo.close()
    assert [x["key"] for x in lines(lost)] == ["k1"] * big + ["k2"] * big
    release.set()
    w._wait_sync_behind()
    assert w.releasable() == 1  # the fsync in flight at 2's finalize covered only 1
    third = checkpoint(3)  # 2 is not known durable: 3 is staged after it
    assert third.meta["stage_off"] == second.meta["stage_off"] + second.meta["stage_len"]
    w._wait_sync_behind()
    assert w.releasable() == 3
    fourth = checkpoint(4)
    assert fourth.meta["stage_off"] == 0  # all it held is durable in the file: start again
    w.close()
    # 4's append lost: recovery redoes it from the start of the staging file.
    lost.write_bytes(out.read_bytes()[:third.meta["end"]])
    monkeypatch.undo()
    again = JsonLinesSink(lost).open(ctx())
    again.recover(fourth.meta, [third.staged, fourth.staged])
    again.close()
    assert lost.read_bytes() == out.read_bytes()
    assert [x["key"] for x in lines(out)] == [f"k{n}" for n in (1, 2, 3, 4) for _ in range(big)]


def test_the_staging_file_starts_again_in_place_keeping_its_blocks(tmp_path: Path) -> None:
    """Once all it holds is durable in the output file, the staging file is overwritten from
    its beginning without being truncated (same file, same length: its blocks are reused),
    and a lost append of the checkpoint staged over older output is redone from it."""
    from resumeflow.sinks import _jsonlines

    out = tmp_path / "out.jsonl"
    w = JsonLinesSink(out).open(ctx())
    big = _jsonlines.INLINE_STAGING_MAX // 100 + 1

    def checkpoint(seq: int, items: int) -> Any:
        w.buffer.extend((f"k{seq}", "x" * 100) for _ in range(items))
        pre = w.precommit(seq)
        assert pre.meta is not None and "staging" in pre.meta
        w.finalize(seq)
        w._wait_sync_behind()
        return pre

    first = checkpoint(1, 2 * big)
    (staging,) = tmp_path.glob("*.rf-staging-*")
    inode, length = staging.stat().st_ino, staging.stat().st_size
    assert length == first.meta["stage_len"]
    second = checkpoint(2, big)
    assert second.meta["stage_off"] == 0 and second.meta["stage_len"] < length
    assert (staging.stat().st_ino, staging.stat().st_size) == (inode, length)
    w.close()
    lost = tmp_path / "lost.jsonl"
    lost.write_bytes(out.read_bytes()[:first.meta["end"]])
    again = JsonLinesSink(lost).open(ctx())
    again.recover(second.meta, [second.staged])
    again.close()
    assert lost.read_bytes() == out.read_bytes()
    assert [x["key"] for x in lines(lost)] == ["k1"] * (2 * big) + ["k2"] * big


def test_finalize_is_idempotent(tmp_path: Path) -> None:
    """Finalizing a checkpoint again, in process or through recovery, appends nothing."""
    out = tmp_path / "out.jsonl"
    w = JsonLinesSink(out).open(ctx())
    w.buffer.append(("a", 1))
    pre = w.precommit(1)
    w.finalize(1)
    w.finalize(1)
    w.close()
    assert pre.staged is not None and pre.meta is not None
    again = JsonLinesSink(out).open(ctx())
    again.recover(pre.meta, [pre.staged])
    again.recover(pre.meta, [pre.staged])
    again.close()
    assert lines(out) == [{"key": "a", "value": 1}]


def test_recovery_finalizes_a_checkpoint_that_was_never_appended(tmp_path: Path) -> None:
    """A crash after the commit point and before finalize is completed by recovery."""
    out = tmp_path / "out.jsonl"
    w = JsonLinesSink(out).open(ctx())
    w.buffer.append(("a", 1))
    first = w.precommit(1)
    w.finalize(1)
    w.buffer.append(("a", 2))
    second = w.precommit(2)  # committed, then the process died before finalize(2)
    w.close()
    assert second.staged is not None and second.meta is not None
    again = JsonLinesSink(out).open(ctx())
    again.recover(second.meta, [second.staged])
    assert lines(out) == [{"key": "a", "value": 1}, {"key": "a", "value": 2}]
    assert again.releasable() == 2
    # The next checkpoint appends after the recovered output.
    again.buffer.append(("a", 3))
    third = again.precommit(3)
    assert third.meta is not None and third.meta["base"] == second.meta["end"]
    again.finalize(3)
    again.close()
    assert [x["value"] for x in lines(out)] == [1, 2, 3]
    assert first.meta is not None


def test_half_done_append_is_cut_back_and_redone(tmp_path: Path) -> None:
    """A crash half-way through an append leaves a torn line that recovery replaces."""
    out = tmp_path / "out.jsonl"
    w = JsonLinesSink(out).open(ctx())
    w.buffer.append(("a", 1))
    w.precommit(1)
    w.finalize(1)
    w.buffer.extend([("b", i) for i in range(100)])
    pre = w.precommit(2)
    with installed(crash_at("sink.finalize.partial")), pytest.raises(Crash):
        w.finalize(2)
    w.close()
    assert pre.staged is not None and pre.meta is not None
    torn = out.stat().st_size
    assert pre.meta["base"] < torn < pre.meta["end"]
    again = JsonLinesSink(out).open(ctx())
    again.recover(pre.meta, [pre.staged])
    again.close()
    assert lines(out) == [{"key": "a", "value": 1}] + [{"key": "b", "value": i}
                                                       for i in range(100)]


def test_recovery_during_a_torn_append_is_itself_recoverable(tmp_path: Path) -> None:
    """A second crash during recovery's own append is repaired by the next recovery."""
    out = tmp_path / "out.jsonl"
    w = JsonLinesSink(out).open(ctx())
    w.buffer.extend([("b", i) for i in range(50)])
    pre = w.precommit(1)
    w.close()
    assert pre.staged is not None and pre.meta is not None
    for _ in range(2):
        crashed = JsonLinesSink(out).open(ctx())
        with installed(crash_at("sink.finalize.partial")), pytest.raises(Crash):
            crashed.recover(pre.meta, [pre.staged])
        crashed.close()
    again = JsonLinesSink(out).open(ctx())
    again.recover(pre.meta, [pre.staged])
    again.close()
    assert lines(out) == [{"key": "b", "value": i} for i in range(50)]


def test_recovery_truncates_output_written_after_the_resumed_checkpoint(tmp_path: Path) -> None:
    """Bytes beyond the resumed checkpoint's end (a checkpoint the store lost) are cut."""
    out = tmp_path / "out.jsonl"
    w = JsonLinesSink(out).open(ctx())
    w.buffer.append(("a", 1))
    kept = w.precommit(1)
    w.finalize(1)
    w.buffer.append(("a", 2))
    w.precommit(2)
    w.finalize(2)  # the store later falls back to checkpoint 1 (or is rewound to it)
    w.close()
    assert kept.meta is not None
    again = JsonLinesSink(out).open(ctx())
    again.recover(kept.meta, [])
    again.close()
    assert lines(out) == [{"key": "a", "value": 1}]


def test_recovery_refuses_a_file_shorter_than_the_checkpoint(tmp_path: Path) -> None:
    """An output file cut outside resumeflow is a DataError, not silently accepted."""
    out = tmp_path / "out.jsonl"
    w = JsonLinesSink(out).open(ctx())
    w.buffer.append(("a", 1))
    pre = w.precommit(1)
    w.finalize(1)
    w.close()
    out.write_bytes(b"")
    assert pre.meta is not None
    again = JsonLinesSink(out).open(ctx())
    with pytest.raises(DataError, match="truncated outside resumeflow"):
        again.recover(pre.meta, [])
    again.close()


def test_existing_output_without_a_checkpoint_is_refused(tmp_path: Path) -> None:
    """Output that no checkpoint of this store wrote is not appended to silently."""
    out = tmp_path / "out.jsonl"
    out.write_text('{"stale":true}\n')
    w = JsonLinesSink(out).open(ctx())
    with pytest.raises(ConfigurationError, match="move the file away"):
        w.recover(None, [])
    w.close()


def test_at_least_once_appends_at_precommit(tmp_path: Path) -> None:
    """Under at-least-once the output is written before the commit point."""
    out = tmp_path / "out.jsonl"
    w = JsonLinesSink(out).open(ctx(guarantee="at-least-once"))
    w.recover(None, [])
    w.buffer.append(("a", 1))
    pre = w.precommit(1)
    assert pre.staged is None
    assert lines(out) == [{"key": "a", "value": 1}]
    w.close()
    again = JsonLinesSink(out).open(ctx(guarantee="at-least-once"))
    again.recover(pre.meta, [])
    again.buffer.append(("a", 1))  # the replayed record
    again.precommit(1)
    again.close()
    assert lines(out) == [{"key": "a", "value": 1}] * 2


def test_value_only_and_unkeyed_output(tmp_path: Path) -> None:
    """``with_key=False`` writes values only; unkeyed streams write items as they are."""
    w = JsonLinesSink(tmp_path / "v.jsonl", with_key=False).open(ctx())
    w.buffer.append(("a", {"total": 1}))
    w.precommit(1)
    w.finalize(1)
    w.close()
    assert lines(tmp_path / "v.jsonl") == [{"total": 1}]
    u = JsonLinesSink(tmp_path / "u.jsonl").open(ctx(keyed=False))
    u.buffer.append([1, "x"])
    u.precommit(1)
    u.finalize(1)
    u.close()
    assert lines(tmp_path / "u.jsonl") == [[1, "x"]]


def test_one_file_per_partition(tmp_path: Path) -> None:
    """Several partitions need ``{partition}`` in the path; each task gets its own file."""
    with pytest.raises(ConfigurationError, match=r"\{partition\}"):
        JsonLinesSink(tmp_path / "out.jsonl").open(ctx(partitions=2))
    sink = JsonLinesSink(str(tmp_path / "out" / "{partition}.jsonl"))
    w = sink.open(ctx(partition="a/b.jsonl", partitions=2))
    assert w.path == tmp_path / "out" / "a_b.jsonl.jsonl"
    w.close()


def test_output_that_is_not_json_is_a_data_error(tmp_path: Path) -> None:
    """An item JSON cannot encode fails at pre-commit with advice."""
    w = JsonLinesSink(tmp_path / "out.jsonl").open(ctx())
    w.buffer.append(("a", object()))
    with pytest.raises(DataError, match="not JSON-serializable"):
        w.precommit(1)
    w.close()


def test_stdout_prints_at_precommit() -> None:
    """Stdout is at-least-once: lines are printed and flushed at pre-commit."""
    stream = io.StringIO()
    w = Stdout(stream).open(ctx())
    w.buffer.extend([("a", 1), ("b", 2)])
    pre = w.precommit(1)
    assert pre.staged is None and pre.in_store is None
    assert stream.getvalue() == '{"key":"a","value":1}\n{"key":"b","value":2}\n'
    assert w.buffer == []


def test_spilled_output_is_staged_with_the_rest_of_its_checkpoint(tmp_path: Path) -> None:
    """``spill()`` encodes the buffer once it holds SPILL_ITEMS items (and empties it); the
    checkpoint then stages exactly the spilled lines followed by the unspilled ones, and the
    next checkpoint starts with nothing spilled."""
    from resumeflow.sinks._jsonlines import SPILL_ITEMS

    out = tmp_path / "out.jsonl"
    w = JsonLinesSink(out).open(ctx())
    w.buffer.extend([("a", i) for i in range(SPILL_ITEMS - 1)])
    assert w.spill() == 0 and len(w.buffer) == SPILL_ITEMS - 1
    w.buffer.append(("a", SPILL_ITEMS - 1))
    assert w.spill() == SPILL_ITEMS and w.buffer == []
    w.buffer.extend([("b", 1), ("b", 2)])
    w.precommit(1)
    assert out.read_bytes() == b""
    w.finalize(1)
    expected = [{"key": "a", "value": i} for i in range(SPILL_ITEMS)]
    expected += [{"key": "b", "value": 1}, {"key": "b", "value": 2}]
    assert lines(out) == expected
    w.buffer.append(("c", 3))
    w.precommit(2)
    w.finalize(2)
    assert lines(out) == [*expected, {"key": "c", "value": 3}]
    w.close()


def test_output_that_is_not_json_fails_at_spill_too(tmp_path: Path) -> None:
    """An item JSON cannot encode fails when the buffer is spilled, with the same advice."""
    from resumeflow.sinks._jsonlines import SPILL_ITEMS

    w = JsonLinesSink(tmp_path / "out.jsonl").open(ctx())
    w.buffer.extend([("a", 1)] * (SPILL_ITEMS - 1) + [("a", object())])
    with pytest.raises(DataError, match="not JSON-serializable"):
        w.spill()
    w.close()
