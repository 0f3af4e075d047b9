"""No-replace renames, atomic writes and collision-free names."""

from __future__ import annotations

import pytest

from core import fsutil


def test_rename_noreplace_never_overwrites(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("new")
    b.write_text("old")
    with pytest.raises(FileExistsError):
        fsutil.rename_noreplace(a, b)
    assert (a.read_text(), b.read_text()) == ("new", "old")


def test_rename_noreplace_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError):
        fsutil.rename_noreplace(tmp_path / "gone", tmp_path / "b")


@pytest.mark.parametrize("use_renameat2", [True, False])
def test_both_code_paths_move_and_refuse(tmp_path, monkeypatch, use_renameat2):
    if not use_renameat2:
        monkeypatch.setattr(fsutil, "_renameat2", None)  # the NFS fallback: link + unlink
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    a.write_text("A")
    c.write_text("C")
    fsutil.rename_noreplace(a, b)
    assert not a.exists() and b.read_text() == "A"
    with pytest.raises(FileExistsError):
        fsutil.rename_noreplace(b, c)
    assert b.read_text() == "A" and c.read_text() == "C"


def test_write_atomic_leaves_no_temp_and_can_refuse(tmp_path):
    target = tmp_path / "x.json"
    fsutil.write_json_atomic(target, {"a": 1})
    fsutil.write_json_atomic(target, {"a": 2})
    assert target.read_text().strip().endswith("}") and '"a": 2' in target.read_text()
    with pytest.raises(FileExistsError):
        fsutil.write_json_atomic(target, {"a": 3}, replace=False)
    assert '"a": 2' in target.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_unique_name_counts_sidecars_as_taken(tmp_path):
    assert fsutil.unique_name(tmp_path, "data.jsonl") == "data.jsonl"
    (tmp_path / "data.jsonl").write_text("")
    (tmp_path / "data.2.jsonl.job.json").write_text("")
    assert fsutil.unique_name(tmp_path, "data.jsonl") == "data.3.jsonl"
