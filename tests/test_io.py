"""Atomic writes and strict readers."""

from __future__ import annotations

import pytest

from llmlab.io import DataError, atomic_path, read_json, read_jsonl, write_json, write_jsonl


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert read_json(target) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"id": 1}\n{"id": 2\n', r"rows\.jsonl:2: invalid JSON"),
        ('{"id": 1}\n[1, 2]\n', r"rows\.jsonl:2: expected a JSON object"),
        ('{"id": 1}\n{"other": 2}\n', r"rows\.jsonl:2: missing field 'id'"),
        ('{"id": 1}\n{"id": 1}\n', r"rows\.jsonl:2: duplicate id 1 \(first on line 1\)"),
        ("", r"rows\.jsonl: file is empty"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, content, message):
    f = tmp_path / "rows.jsonl"
    f.write_text(content)
    with pytest.raises(DataError, match=message):
        read_jsonl(f, required=("id",), id_field="id")


def test_wrong_encoding_and_missing_file(tmp_path):
    f = tmp_path / "latin.jsonl"
    f.write_bytes('{"id": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="not valid UTF-8"):
        read_jsonl(f)
    with pytest.raises(DataError, match="file not found"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_jsonl_round_trip(tmp_path):
    rows = [{"id": i, "text": f"row {i} é"} for i in range(5)]
    assert write_jsonl(tmp_path / "r.jsonl", rows) == 5
    assert read_jsonl(tmp_path / "r.jsonl", id_field="id") == rows


def test_replace_dir_swaps_whole_directories(tmp_path) -> None:  # noqa: ANN001
    from llmlab.io import replace_dir

    out, work = tmp_path / "out", tmp_path / "out.partial"
    out.mkdir()
    (out / "old.txt").write_text("old")
    work.mkdir()
    (work / "new.txt").write_text("new")
    assert replace_dir(work, out) == out
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left aside
    work.mkdir()
    (work / "b.txt").write_text("b")
    replace_dir(work, tmp_path / "fresh")  # no old output to move aside
    assert (tmp_path / "fresh" / "b.txt").read_text() == "b"


def test_staged_dir_replaces_whole_or_not_at_all(tmp_path) -> None:  # noqa: ANN001
    import os
    import stat

    from llmlab.io import staged_dir

    out = tmp_path / "adapter"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="half-way"):
        with staged_dir(out) as work:
            (work / "new.txt").write_text("new")
            raise RuntimeError("half-way")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]  # the old output is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging left behind
    old_mask = os.umask(0o027)
    try:
        with staged_dir(out) as work:
            assert work.parent == tmp_path and work != out
            (work / "new.txt").write_text("new")
    finally:
        os.umask(old_mask)
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    # the umask's mode, not mkdtemp's 0700 (group members read a shared DVC cache)
    assert stat.S_IMODE(out.stat().st_mode) == 0o750


def test_disk_full_names_the_output_and_leaves_nothing(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    import errno
    from pathlib import Path

    from llmlab.io import OutputError

    def full(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise OSError(errno.ENOSPC, "No space left on device")

    target = tmp_path / "metrics.json"
    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OutputError) as err:
        write_json(target, {"auc": 0.5})
    assert str(err.value) == f"{target}: cannot write output (No space left on device)"
    assert list(tmp_path.iterdir()) == []


def test_input_errors_inside_an_atomic_write_keep_their_own_name(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(FileNotFoundError, match="no_input.txt"):
        with atomic_path(tmp_path / "out.txt"):
            (tmp_path / "no_input.txt").read_text()
    assert list(tmp_path.iterdir()) == []


def test_rename_failure_names_the_output(tmp_path) -> None:  # noqa: ANN001
    from llmlab.io import OutputError, replace_dir

    out = tmp_path / "acts"
    with pytest.raises(OutputError, match=rf"^{out}: cannot write output"):
        replace_dir(tmp_path / "never_written.partial", out)


def test_missing_keys_name_the_file_and_line(tmp_path) -> None:  # noqa: ANN001
    from llmlab.io import MissingKeyError

    meta = tmp_path / "meta.json"
    write_json(meta, {"runs": {"seed_0": {"adapter": "a"}}})
    doc = read_json(meta)
    assert doc == {"runs": {"seed_0": {"adapter": "a"}}}
    with pytest.raises(DataError, match=rf"^{meta}: missing key 'layers'$"):
        doc["layers"]
    with pytest.raises(KeyError):  # code that catches KeyError keeps working
        doc["runs"]["seed_0"]["loss"]
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"id": "a"}\n\n{"id": "b", "steer": {"layer": 1}}\n')
    got = read_jsonl(rows)
    with pytest.raises(MissingKeyError, match=rf"^{rows}:3: missing key 'strength'$"):
        got[1]["steer"]["strength"]
    assert str(MissingKeyError("x: missing key 'k'")) == "x: missing key 'k'"
