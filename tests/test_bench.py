"""The benchmarks run on CPU with tiny settings (their numbers only mean something on a GPU)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import pytest  # noqa: E402
import rim_overhead  # noqa: E402
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
