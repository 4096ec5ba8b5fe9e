"""datamodules/files.py: atomic writes leave either the old file or the whole new one."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from datamodules.files import (
    atomic_path,
    atomic_write,
    generated_folder,
    json_safe,
    remove_stale_temporaries,
    write_json,
)


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


# -- generated_folder ------------------------------------------------------------------------------

MARKER = ".made.json"


def _writer(calls: list[str], text: str = "a"):
    def write(folder):
        calls.append(folder.name)
        (folder / "sub").mkdir()
        (folder / "sub" / "x.txt").write_text(text)

    return write


def _siblings(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir())


def test_generated_folder_is_made_once_and_remade_when_the_parameters_change(tmp_path):
    root, calls = tmp_path / "set", []
    assert generated_folder(root, {"n": (1, 2)}, _writer(calls), MARKER) == root
    assert (root / "sub" / "x.txt").read_text() == "a" and len(calls) == 1
    assert calls[0].startswith(".set.tmp-")  # written in a hidden sibling, then renamed
    assert json.loads((root / MARKER).read_text()) == {"n": [1, 2]}
    generated_folder(root, {"n": [1, 2]}, _writer(calls), MARKER)  # a tuple reads back as a list
    assert len(calls) == 1
    generated_folder(root, {"n": 3}, _writer(calls, "b"), MARKER)
    assert (root / "sub" / "x.txt").read_text() == "b" and len(calls) == 2
    assert _siblings(tmp_path) == ["set"]  # neither the temporary nor the old set is left


def test_an_interrupted_generation_leaves_nothing_under_the_final_name(tmp_path):
    root = tmp_path / "set"

    def killed(folder):
        (folder / "half.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generated_folder(root, {"n": 1}, killed, MARKER)
    assert _siblings(tmp_path) == []
    # Interrupting the regeneration of a complete set keeps that set.
    generated_folder(root, {"n": 1}, _writer([]), MARKER)
    with pytest.raises(KeyboardInterrupt):
        generated_folder(root, {"n": 2}, killed, MARKER)
    assert _siblings(tmp_path) == ["set"] and json.loads((root / MARKER).read_text()) == {"n": 1}
    assert sorted(p.name for p in root.iterdir()) == [MARKER, "sub"]


def test_a_non_empty_foreign_folder_is_refused_and_left_alone(tmp_path):
    root = tmp_path / "real_dataset"
    root.mkdir()
    (root / "data.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=f"real_dataset exists, is not empty.*{MARKER}"):
        generated_folder(root, {"n": 1}, _writer([]), MARKER)
    assert _siblings(tmp_path) == ["real_dataset"] and _siblings(root) == ["data.txt"]
    (tmp_path / "empty").mkdir()  # an empty folder is free to use
    generated_folder(tmp_path / "empty", {"n": 1}, _writer([]), MARKER)
    assert (tmp_path / "empty" / "sub" / "x.txt").is_file()


def test_another_process_finishing_the_same_set_first_wins(tmp_path):
    """While this process generates, a second Python process generates and installs the same set;
    this one then keeps the other's copy and discards its own."""
    root, ours = tmp_path / "set", []
    other = (
        "import sys; from pathlib import Path; from datamodules.files import generated_folder\n"
        "def write(f):\n"
        "    (f / 'sub').mkdir(); (f / 'sub' / 'x.txt').write_text('theirs')\n"
        f"generated_folder(Path(sys.argv[1]), {{'n': 1}}, write, {MARKER!r})\n"
    )

    def write(folder):
        ours.append(folder)
        (folder / "sub").mkdir()
        (folder / "sub" / "x.txt").write_text("ours")
        subprocess.run([sys.executable, "-c", other, str(root)], check=True, env=_env())

    generated_folder(root, {"n": 1}, write, MARKER)
    assert (root / "sub" / "x.txt").read_text() == "theirs"
    assert not ours[0].exists() and _siblings(tmp_path) == ["set"]
    # Four processes started together on a stale set: each returns, one complete set remains.
    stale = tmp_path / "set"
    racer = other.replace("'theirs')", "'theirs'); __import__('time').sleep(0.2)")
    racer = racer.replace("{'n': 1}", "{'n': 2}")
    procs = [
        subprocess.Popen([sys.executable, "-c", racer, str(stale)], env=_env()) for _ in range(4)
    ]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0, 0]
    assert json.loads((stale / MARKER).read_text()) == {"n": 2}
    assert (stale / "sub" / "x.txt").read_text() == "theirs" and _siblings(tmp_path) == ["set"]


def _env():
    import os
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}


def test_stale_temporaries_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    target = tmp_path / "last.ckpt"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with atomic_path(target) as live:  # this process's temporary, being written
        stale = tmp_path / f".last.ckpt.tmp-{dead.pid}-x1y2.ckpt"
        foreign = tmp_path / ".last.ckpt.tmp-notes.txt"
        other = tmp_path / f".other.ckpt.tmp-{dead.pid}-a.ckpt"
        for path in (stale, foreign, other):
            path.write_text("half")
        assert remove_stale_temporaries(target) == [stale]
        assert live.exists() and foreign.exists() and other.exists() and not stale.exists()
        live.write_text("whole")
    assert target.read_text() == "whole"
