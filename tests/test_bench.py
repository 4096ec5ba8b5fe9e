"""The benchmarks run on CPU with tiny settings (their numbers only mean something on a GPU)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import pytest  # noqa: E402
import rim_overhead  # noqa: E402


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
    assert set(ms) == {"ce", "arbs_ilm"} and all(v > 0 for v in ms.values())
    assert saved["images_per_s"]["ce"] == pytest.approx(2 / (ms["ce"] / 1000))
