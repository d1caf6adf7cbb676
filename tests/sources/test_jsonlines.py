"""JSON-lines sources: byte-offset positions, exact resume, partial and blank lines, partitions."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import msgspec
import pytest

from resumeflow.errors import ConfigurationError
from resumeflow.sources import Batch, JsonLines, JsonLinesDir


def read_all(reader: Any, max_records: int = 1000) -> list[Batch]:
    """Every batch up to the end of a bounded reader, or up to "nothing now" when following.

    ``read`` may return ``None`` before the end while it is still gathering a long line; a
    bounded reader is done only once ``at_end``.
    """
    batches = []
    for _ in range(10_000):
        batch = reader.read(max_records)
        if batch is not None:
            batches.append(batch)
        elif reader.at_end or reader._follow:
            return batches
    raise AssertionError("the reader never reached the end of its file")


def lines_of(batches: list[Batch]) -> list[bytes]:
    return [item for batch in batches for item in batch.items]


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def offsets(data: bytes) -> list[int]:
    """Byte offset of every non-blank line of ``data``."""
    out, at = [], 0
    for line in data.split(b"\n")[:-1]:
        if line.strip():
            out.append(at)
        at += len(line) + 1
    return out


DATA = b"".join(b'{"i":%d,"pad":"%s"}\n' % (i, b"x" * (i % 7)) for i in range(50))


def test_positions_are_byte_offsets_of_the_next_line(tmp_path: Path) -> None:
    """Each batch starts at its first line's offset and ends at the next line's offset."""
    path = write(tmp_path / "e.jsonl", DATA)
    reader = JsonLines(path).open("0", None, follow=False)
    starts = offsets(DATA)
    for i in range(50):
        batch = reader.read(1)
        assert batch is not None
        assert batch.start == starts[i]
        assert batch.end == (starts[i + 1] if i + 1 < 50 else len(DATA))
        assert reader.position == batch.end
        assert batch.locate(0) == starts[i]
    assert reader.read(1) is None and reader.at_end
    reader.close()


def test_locate_maps_every_item_to_its_offset(tmp_path: Path) -> None:
    """Within a batch, ``locate(i)`` is the byte offset of item ``i``."""
    path = write(tmp_path / "e.jsonl", DATA)
    (batch,) = read_all(JsonLines(path).open("0", None, follow=False))
    assert [batch.locate(i) for i in range(len(batch.items))] == offsets(DATA)


def test_resume_from_any_position_reads_exactly_the_rest(tmp_path: Path) -> None:
    """Opening at the offset of any line yields exactly that line and the ones after it."""
    path = write(tmp_path / "e.jsonl", DATA)
    all_lines = DATA.split(b"\n")[:-1]
    for i, at in enumerate([*offsets(DATA), len(DATA)]):
        reader = JsonLines(path).open("0", at, follow=False)
        assert lines_of(read_all(reader, 7)) == all_lines[i:]
        assert reader.position == len(DATA)
        reader.close()


def test_position_past_the_end_is_refused(tmp_path: Path) -> None:
    """A checkpoint position beyond the file means the file was truncated: say so."""
    path = write(tmp_path / "e.jsonl", DATA)
    with pytest.raises(ConfigurationError, match="truncated or replaced"):
        JsonLines(path).open("0", len(DATA) + 1, follow=False)


def test_partial_last_line_is_not_consumed_until_complete(tmp_path: Path) -> None:
    """An unterminated last line is left unread; once its newline comes, it is read whole."""
    path = write(tmp_path / "e.jsonl", b'{"i":1}\n{"i":2}\n{"i":3')
    reader = JsonLines(path).open("0", None, follow=False)
    assert lines_of(read_all(reader)) == [b'{"i":1}', b'{"i":2}']
    assert reader.at_end
    assert reader.position == 16
    reader.close()
    with open(path, "ab") as f:
        f.write(b',"late":true}\n')
    reader = JsonLines(path).open("0", 16, follow=False)
    assert lines_of(read_all(reader)) == [b'{"i":3,"late":true}']
    assert reader.position == path.stat().st_size
    reader.close()


def test_follow_waits_for_the_newline_of_a_partial_line(tmp_path: Path) -> None:
    """While following, a line being written is returned only once it is complete."""
    path = write(tmp_path / "e.jsonl", b'{"i":1}\n{"i":')
    reader = JsonLines(path).open("0", None, follow=True)
    assert lines_of(read_all(reader)) == [b'{"i":1}']
    assert reader.position == 8 and not reader.at_end
    with open(path, "ab") as f:
        f.write(b"2")
    assert reader.read(10) is None and reader.position == 8
    with open(path, "ab") as f:
        f.write(b'}\n{"i":3}\n')
    batch = reader.read(10)
    assert batch is not None and list(batch.items) == [b'{"i":2}', b'{"i":3}']
    assert batch.start == 8 and reader.position == path.stat().st_size
    assert not reader.at_end
    reader.close()


def test_blank_lines_are_skipped_but_counted_in_positions(tmp_path: Path) -> None:
    """Empty and whitespace-only lines yield nothing; positions still step over them."""
    data = b'{"i":1}\n\n   \n{"i":2}\n\t\r\n{"i":3}\n'
    path = write(tmp_path / "e.jsonl", data)
    (batch,) = read_all(JsonLines(path).open("0", None, follow=False))
    assert list(batch.items) == [b'{"i":1}', b'{"i":2}', b'{"i":3}']
    assert [batch.locate(i) for i in range(3)] == offsets(data)
    assert batch.end == len(data)


def test_whitespace_only_line_without_empty_line_is_skipped(tmp_path: Path) -> None:
    """A whitespace-only line is skipped even when no empty line is in the same batch,
    so every later record of the batch keeps its own byte offset."""
    data = b'{"i":1}\n   \n{"i":2}\nbad\n'
    path = write(tmp_path / "e.jsonl", data)
    (batch,) = read_all(JsonLines(path).open("0", None, follow=False))
    assert list(batch.items) == [b'{"i":1}', b'{"i":2}', b"bad"]
    assert [batch.locate(i) for i in range(3)] == [0, 12, 20]


def test_batches_never_exceed_max_records_nor_split_a_line(tmp_path: Path) -> None:
    """Reads return at most ``max_records`` whole lines, covering the file without gaps."""
    path = write(tmp_path / "e.jsonl", DATA)
    batches = read_all(JsonLines(path).open("0", None, follow=False), max_records=6)
    assert all(len(b.items) <= 6 for b in batches)
    assert all(a.end == b.start for a, b in itertools.pairwise(batches))
    assert lines_of(batches) == DATA.split(b"\n")[:-1]


def test_lines_longer_than_a_read_chunk(tmp_path: Path) -> None:
    """A line of several megabytes is read whole, with exact positions around it."""
    big = b'{"blob":"' + b"y" * (3 << 20) + b'"}'
    data = b'{"i":1}\n' + big + b'\n{"i":2}\n'
    path = write(tmp_path / "e.jsonl", data)
    batches = read_all(JsonLines(path).open("0", None, follow=False), max_records=1)
    assert lines_of(batches) == [b'{"i":1}', big, b'{"i":2}']
    assert [b.start for b in batches] == [0, 8, 9 + len(big)]


def test_a_long_line_does_not_stall_the_reader(tmp_path: Path) -> None:
    """A line longer than a read chunk comes back from one ``read``: no empty reads (which
    the runtime would answer with a poll sleep) before the end of a complete file."""
    big = b'{"blob":"' + b"z" * (5 << 20) + b'"}'
    path = write(tmp_path / "e.jsonl", big + b'\n{"i":2}\n')
    reader = JsonLines(path).open("0", None, follow=False)
    first = reader.read(10)
    assert first is not None and list(first.items) == [big, b'{"i":2}']
    assert reader.read(10) is None and reader.at_end


def test_decode_parses_json_and_fails_on_bad_lines(tmp_path: Path) -> None:
    """``decode`` returns the JSON value and raises on a malformed line."""
    source = JsonLines(write(tmp_path / "e.jsonl", b""))
    assert source.decode(b'{"a":[1,2]}') == {"a": [1, 2]}
    with pytest.raises(msgspec.DecodeError):
        source.decode(b'{"a":')


def test_single_file_has_one_partition_named_by_default_after_the_file(tmp_path: Path) -> None:
    """``JsonLines`` is one partition, ``"0"``, and its name defaults to the file name."""
    source = JsonLines(write(tmp_path / "e.jsonl", DATA))
    assert source.partitions() == ["0"]
    assert source.name == "e.jsonl"
    assert JsonLines(tmp_path / "e.jsonl", name="orders").name == "orders"


def test_missing_file_fails_at_start(tmp_path: Path) -> None:
    """A source file that does not exist fails in ``partitions()`` with advice."""
    with pytest.raises(ConfigurationError, match="does not exist; check the path"):
        JsonLines(tmp_path / "nope.jsonl").partitions()


def test_directory_instead_of_file_fails_at_start(tmp_path: Path) -> None:
    """A path that is not a regular file is refused at start."""
    with pytest.raises(ConfigurationError, match="check the path"):
        JsonLines(tmp_path).partitions()


def test_unreadable_file_fails_at_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file without read permission is refused at start, naming the fix."""
    path = write(tmp_path / "e.jsonl", DATA)
    real_access = os.access

    def access(p: Any, mode: int) -> bool:
        if Path(p) == path and mode == os.R_OK:
            return False  # as for a chmod 000 file (the suite may run as root)
        return real_access(p, mode)

    monkeypatch.setattr(os, "access", access)
    with pytest.raises(ConfigurationError, match="not readable; fix its permissions"):
        JsonLines(path).partitions()


def test_directory_source_has_one_partition_per_file(tmp_path: Path) -> None:
    """``JsonLinesDir`` makes one partition per matching file, each reading its own file."""
    (tmp_path / "in").mkdir()
    for name in ("b.jsonl", "a.jsonl", "c.jsonl"):
        write(tmp_path / "in" / name, b'{"file":"%s"}\n' % name.encode())
    write(tmp_path / "in" / "skip.txt", b"not matched\n")
    source = JsonLinesDir(str(tmp_path / "in" / "*.jsonl"))
    assert source.partitions() == ["a.jsonl", "b.jsonl", "c.jsonl"]
    for name in source.partitions():
        reader = source.open(name, None, follow=False)
        assert lines_of(read_all(reader)) == [b'{"file":"%s"}' % name.encode()]
        reader.close()


def test_directory_source_without_files_fails_at_start(tmp_path: Path) -> None:
    """A pattern that matches nothing fails at start."""
    with pytest.raises(ConfigurationError, match="no file matches"):
        JsonLinesDir(str(tmp_path / "*.jsonl")).partitions()


def test_directory_source_refuses_two_files_of_one_name(tmp_path: Path) -> None:
    """Partitions are named by file name, so two files of one name are refused."""
    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        write(tmp_path / sub / "e.jsonl", DATA)
    with pytest.raises(ConfigurationError, match="two files named"):
        JsonLinesDir(str(tmp_path / "*" / "e.jsonl")).partitions()


def test_directory_source_partition_that_vanished(tmp_path: Path) -> None:
    """Opening a partition whose file is gone says to restore it."""
    write(tmp_path / "a.jsonl", DATA)
    source = JsonLinesDir(str(tmp_path / "*.jsonl"))
    source.partitions()
    with pytest.raises(ConfigurationError, match="is gone"):
        source.open("b.jsonl", None, follow=False)
