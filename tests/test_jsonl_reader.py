"""JsonlReader: what read_jsonl returns, at every moment of a file being appended to, replaced or cut,
while parsing each complete line once (bitnet-status --watch on a long run's 400k-row scalars)."""

import json
import os

from bitnet.run import jsonl
from bitnet.run.jsonl import JsonlReader, read_jsonl


def counting_parses(monkeypatch) -> list[int]:
    """Patch jsonl.parse_lines to record how many lines each call was given."""
    calls, real = [], jsonl.parse_lines

    def parse(lines):
        lines = list(lines)
        calls.append(len(lines))
        return real(lines)
    monkeypatch.setattr(jsonl, "parse_lines", parse)
    return calls


def test_every_read_equals_read_jsonl_while_rows_are_appended_torn_and_completed(tmp_path):
    path = tmp_path / "m.jsonl"
    reader = JsonlReader()
    assert reader.read(path) == [] == read_jsonl(path)  # missing
    with open(path, "w", encoding="utf-8") as f:
        for step in range(1, 4):
            f.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\n")
        f.flush()
        assert reader.read(path) == read_jsonl(path) == [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
        f.write('{"step": 4, "lo')  # a row being written: skipped, and not kept as half a row
        f.flush()
        assert reader.read(path) == read_jsonl(path) and len(reader.read(path)) == 3
        f.write('ss": 0.25}')  # complete but with no newline yet: read_jsonl parses it, so does the reader
        f.flush()
        assert reader.read(path) == read_jsonl(path) and reader.read(path)[-1] == {"step": 4, "loss": 0.25}
        f.write('\nnot json\n["a list"]\n{"step": 5, "text": "\u00e9t\u00e9 \\u2028"}\n')
        f.flush()
        assert reader.read(path) == read_jsonl(path) and [r["step"] for r in reader.read(path)] == [1, 2, 3, 4, 5]


def test_a_refresh_parses_only_the_appended_lines(tmp_path, monkeypatch):
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1000)))
    reader = JsonlReader()
    calls = counting_parses(monkeypatch)
    assert len(reader.read(path)) == 1000
    with open(path, "a") as f:
        f.write(json.dumps({"step": 1000}) + "\n" + '{"step": 10')
    rows = reader.read(path)
    assert [r["step"] for r in rows[-2:]] == [999, 1000]
    # first read: 1000 lines (+ the empty text after the last newline); second: the new line (+ its
    # trailing empty piece) and the torn tail, never the 1000 again
    assert calls[0] == 1001 and sum(calls[2:]) <= 3, calls


def test_a_replaced_or_shortened_file_is_read_again_from_its_start(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n')
    reader = JsonlReader()
    assert len(reader.read(path)) == 2
    path.write_text('{"step": 7}\n')  # same inode, shorter: cut and rewritten
    assert reader.read(path) == [{"step": 7}]
    other = tmp_path / "new.jsonl"
    other.write_text('{"step": 8}\n{"step": 9}\n{"step": 10}\n')  # longer, another inode
    os.replace(other, path)
    assert reader.read(path) == [{"step": 8}, {"step": 9}, {"step": 10}]
    path.unlink()
    assert reader.read(path) == []


def test_returned_lists_are_the_callers_own(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n')
    reader = JsonlReader()
    reader.read(path).append({"step": 99})
    assert reader.read(path) == [{"step": 1}]


def test_a_file_rewritten_behind_the_readers_back_is_never_mixed_with_the_kept_rows(tmp_path):
    """Inode numbers are reused at once (ext4), and a file can be cut and regrown past the kept offset
    between two refreshes: the kept rows are checked against the file's bytes, not its identity."""
    path = tmp_path / "m.jsonl"
    rows = lambda tag, n: "".join(json.dumps({"tag": tag, "i": i}) + "\n" for i in range(n))  # noqa: E731
    reader = JsonlReader()
    path.write_text(rows("a", 2))
    assert reader.read(path) == read_jsonl(path)
    path.unlink()
    path.write_text(rows("b", 3))  # deleted and made again, longer: likely the same inode
    assert reader.read(path) == read_jsonl(path) and {r["tag"] for r in reader.read(path)} == {"b"}
    with open(path, "r+") as f:  # cut and rewritten longer in place: same inode, larger size
        f.truncate(0)
        f.write(rows("c", 5))
    assert reader.read(path) == read_jsonl(path) and {r["tag"] for r in reader.read(path)} == {"c"}
    for tag, n in (("d", 6), ("e", 7)):  # two replacements between refreshes (rsync mirroring a run)
        other = tmp_path / f"{tag}.jsonl"
        other.write_text(rows(tag, n))
        os.replace(other, path)
    assert reader.read(path) == read_jsonl(path) and [r["tag"] for r in reader.read(path)] == ["e"] * 7
