"""datamodules/files.py: atomic writes leave either the old file or the whole new one."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from datamodules.files import atomic_path, atomic_write, json_safe, write_json


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "scores.json"
    atomic_write(target, "old")
    atomic_write(target, b"new")
    assert target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["scores.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "weights.npy"
    np.save(target, np.arange(3))
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        np.save(tmp, np.zeros(5))
        raise RuntimeError("killed mid-write")
    np.testing.assert_array_equal(np.load(target), np.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["weights.npy"]


def test_the_temporary_keeps_the_suffix_for_writers_that_append_one(tmp_path):
    target = tmp_path / "counts.npy"
    with atomic_path(target, fsync=True) as tmp:
        assert tmp.suffix == ".npy" and tmp.parent == tmp_path
        np.save(tmp, np.ones(2))  # np.save appends ".npy" unless the name already ends with it
    np.testing.assert_array_equal(np.load(target), np.ones(2))


def test_json_nan_becomes_null_unless_kept(tmp_path):
    obj = {"a": [1.0, math.nan], "b": {"c": math.inf}, "d": (2, -math.inf)}
    assert json_safe(obj) == {"a": [1.0, None], "b": {"c": None}, "d": [2, None]}
    write_json(tmp_path / "r.json", obj)
    assert json.loads((tmp_path / "r.json").read_text())["a"] == [1.0, None]
    write_json(tmp_path / "k.json", obj, keep_nan=True)
    assert math.isnan(json.loads((tmp_path / "k.json").read_text())["a"][1])


def test_written_files_get_the_mode_of_a_plain_open(tmp_path):
    """Not the temporary file's private 0600: other readers of a prediction folder can read it."""
    import stat

    atomic_write(tmp_path / "atomic.txt", "x")
    (tmp_path / "plain.txt").write_text("x")
    modes = [stat.S_IMODE((tmp_path / f"{n}.txt").stat().st_mode) for n in ("atomic", "plain")]
    assert modes[0] == modes[1]
