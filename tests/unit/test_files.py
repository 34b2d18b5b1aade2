"""Atomic writes: an earlier file or folder survives a write that fails half-way."""

from __future__ import annotations

import pytest

from cellscan.files import swap_in, write_atomic


def test_write_atomic_replaces_whole_and_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "out" / "results.csv"
    write_atomic(target, "image,status\n")
    assert target.read_text() == "image,status\n"
    write_atomic(target, b"image,status\na.png,ok\n")
    assert target.read_text() == "image,status\na.png,ok\n"
    with pytest.raises(TypeError):  # fails in the middle of the write: the earlier file is whole
        write_atomic(target, 12345)  # type: ignore[arg-type]
    assert target.read_text() == "image,status\na.png,ok\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["results.csv"]


def test_swap_in_replaces_a_folder_and_puts_the_old_one_back_when_the_new_one_cannot_come(tmp_path):
    target = tmp_path / "export"
    first = tmp_path / ".export-1"
    first.mkdir()
    (first / "model.onnx").write_text("v1")
    swap_in(first, target)
    assert (target / "model.onnx").read_text() == "v1" and not first.exists()
    second = tmp_path / ".export-2"
    second.mkdir()
    (second / "model.onnx").write_text("v2")
    swap_in(second, target)
    assert (target / "model.onnx").read_text() == "v2"
    with pytest.raises(FileNotFoundError):  # the new folder vanished: the earlier export stays in place
        swap_in(tmp_path / ".export-3", target)
    assert (target / "model.onnx").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
