"""The benchmarks run on CPU with tiny settings (their numbers only mean something on a GPU)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import pytest  # noqa: E402
import rim_overhead  # noqa: E402
import step_phases  # noqa: E402
import train_step  # noqa: E402


def test_rim_overhead_smoke(tmp_path):
    out = tmp_path / "r.json"
    result = rim_overhead.main(
        [
            "--device",
            "cpu",
            "--backbone",
            "18",
            "--size",
            "64",
            "--batch",
            "2",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--repeats",
            "1",
            "--json",
            str(out),
        ]
    )
    saved = json.loads(out.read_text())
    assert saved["overhead_percent"] == result["overhead_percent"]
    ms = saved["ms_per_step"]
    assert set(ms) == {"ce", "arbs_ilm", "arbs_ilm_kept"} and all(v > 0 for v in ms.values())
    assert "labelled_vs_kept_normalizer_percent" in saved
    assert saved["images_per_s"]["ce"] == pytest.approx(2 / (ms["ce"] / 1000))


def test_train_step_bench_compares_identical_work(tmp_path):
    """rimlab's Lightning step and the hand loop start from the same weights on the same batch:
    their first losses agree; the report's derived numbers follow from its measurements."""
    out = tmp_path / "t.json"
    args = ["--device", "cpu", "--size", "48", "--batch", "2", "--steps", "1", "--warmup", "1"]
    args += ["--override", "model=pspnet_lite", "--override", "model.dropout=0"]
    args += ["--precision", "32", "--data-batches", "2", "--data-dir", str(tmp_path / "data")]
    result = train_step.main([*args, "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    loss = result["first_step_loss"]
    assert loss["rimlab"] == pytest.approx(loss["hand"], rel=1e-5)
    assert loss["same_maths"] == pytest.approx(loss["rimlab"], rel=1e-6)  # rimlab's own maths
    for k in ("rimlab", "hand"):
        ms = result["ms_per_step"][k]
        assert result["images_per_s"][k] == pytest.approx(2 / (ms / 1000))
        tflops = result["gflop_per_image"] * 1e9 * 2 / (ms / 1000) / 1e12
        assert result["tflops_achieved"][k] == pytest.approx(tflops)
    assert result["gflop_per_image"] > 0 and result["data_images_per_s"] > 0


def test_phase_times_split_each_step_at_its_marks():
    """A hand-made record: phases run mark to mark, the last to the next step's first mark (or
    from a ``resume`` mark on, or up to ``end``), and a step's phases add up to its total."""
    by_step = {
        0: {"a": 0.0, "b": 1.0, "c": 3.0, "other": 4.0, "done": 9.0},
        1: {"a": 10.0, "b": 12.0, "c": 15.0, "other": 16.0, "done": 20.0},
        2: {"a": 21.0},
    }
    phases, totals = step_phases.phase_times(by_step, ["a", "b", "c"], range(2))
    assert phases == {"a": [1.0, 2.0], "b": [2.0, 3.0], "c": [7.0, 6.0]}
    assert totals == [10.0, 11.0]
    phases, totals = step_phases.phase_times(
        by_step, ["a", "b", "c"], range(2), resume={"c": "done"}
    )
    assert phases["c"] == [1.0, 1.0] and totals == [4.0, 6.0]  # 9 -> 10 and 20 -> 21
    # A middle phase resumed: b runs from "skip" (2.5) to c (3), the 1.5 s before it left out.
    one = {0: {"a": 0.0, "b": 1.0, "skip": 2.5, "c": 3.0}, 1: {"a": 5.0}}
    phases, totals = step_phases.phase_times(one, ["a", "b", "c"], range(1), resume={"b": "skip"})
    assert phases == {"a": [1.0], "b": [0.5], "c": [2.0]} and totals == [3.5]
    phases, totals = step_phases.phase_times(by_step, ["a", "b"], range(2), end="c")
    assert phases == {"a": [1.0, 2.0], "b": [2.0, 3.0]} and totals == [3.0, 5.0]


def test_step_phases_add_up_to_the_step(tmp_path):
    """Every phase of both variants is measured, and their means add up to the step's mean."""
    out = tmp_path / "p.json"
    args = ["--size", "16", "--batch", "2", "--steps", "3", "--warmup", "1", "--no-as-run"]
    args += ["--override", "model=pspnet_lite", "--data-dir", str(tmp_path / "data")]
    result = step_phases.main([*args, "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert list(result["rimlab"]) == list(step_phases.RIMLAB_PHASES)
    assert list(result["hand"]) == list(step_phases.HAND_PHASES)
    for variant in ("rimlab", "hand"):
        rows = result[variant].values()
        assert all(row["mean_ms"] >= 0 for row in rows)
        total = sum(row["mean_ms"] for row in rows)
        assert total == pytest.approx(result["total_ms"][variant]["mean"], rel=1e-9)
    assert result["rimlab"]["net"]["mean_ms"] > 0 and result["hand"]["backward"]["mean_ms"] > 0


def test_opencv_warps_sample_labels_at_the_exact_nearest_pixel(tmp_path):
    """The pinned OpenCV's nearest warp picks the exact float64 nearest source pixel except at
    ties (a source point within 1e-4 px of a half-pixel), and its bilinear warp is the exact
    value rounded (max error 0.5 plus its weights' rounding). OpenCV 4.14 fails both (1/1024 px
    nearest coordinates, 6.4 grey levels off): the augmentation fingerprints pin a release."""
    import opencv_warp

    out = tmp_path / "warp.json"
    result = opencv_warp.main(["--trials", "20", "--json", str(out)])
    assert json.loads(out.read_text())["nearest_mismatches"] == result["nearest_mismatches"]
    assert result["pixels"] > 100_000
    assert result["nearest_max_tie_distance"] < 1e-4
    assert result["nearest_mismatches"] <= result["pixels"] * 1e-5
    assert 0.45 < result["bilinear_max_error"] < 0.55


@pytest.mark.slow
def test_device_check_script_runs_every_part_on_the_cpu(tmp_path):
    """``RIMLAB_DEVICE_CHECK_CPU=1 bash bench/device_check.sh``: every part (the CPU half of
    tests/test_gpu.py, both train-step stages, the data pipeline) runs and lands in one JSON."""
    import os
    import subprocess
    import xml.etree.ElementTree as ET

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "RIMLAB_DEVICE_CHECK_CPU": "1", "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(root / "bench" / "device_check.sh"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "device_check.json").read_text())
    parts = report["parts"]
    assert set(parts) == {"gpu_tests", "train_step_stage1", "train_step_stage2", "data_pipeline"}
    assert all(p["rc"] == 0 for p in parts.values()), {k: p["log_tail"] for k, p in parts.items()}
    suite = ET.parse(tmp_path / "gpu_tests.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) > 0 and int(suite.get("failures")) == 0
    for stage in ("train_step_stage1", "train_step_stage2"):
        result = parts[stage]["result"]
        assert result["ms_per_step"]["rimlab"] > 0 and "rimlab_minus_hand_ms" in result
    speeds = parts["data_pipeline"]["result"]["images_per_s"]
    assert set(speeds) == {"rimlab", "rimlab_pixel_cache", "rimlab_reference", "albumentations"}
    assert all(v > 0 for v in speeds.values())
