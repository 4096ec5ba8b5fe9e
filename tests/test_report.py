"""The sweep report on a fake multirun folder."""

from __future__ import annotations

import csv
import json

from experiments.report import main


def _job(root, num, overrides, val, extra=None):
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job / "results.json").write_text(json.dumps({"val": val, **(extra or {})}))


def test_report_tables_and_plots(tmp_path):
    names = ["bg", "arm", "hand"]
    base = {
        "PA": 90.0,
        "MPA": 50.0,
        "mIoU": 40.0,
        "mAcc": 45.0,
        "IoU": dict(zip(names, [90.0, 20.0, None], strict=True)),
        "CPA": {},
    }
    rim = {
        "PA": 91.0,
        "MPA": 57.5,
        "mIoU": 42.25,
        "mAcc": 48.0,
        "IoU": dict(zip(names, [90.5, 25.0, 11.0], strict=True)),
        "CPA": {},
    }
    extra = {
        "stage1": {"early_cpa": dict(zip(names, [0.9, 0.3, 0.5], strict=True))},
        "class_pixel_counts": dict(zip(names, [1000, 100, 10], strict=True)),
    }
    _job(tmp_path, 0, ["experiment=rim_pspnet", "sampler=none", "loss=ce"], base)
    _job(tmp_path, 1, ["experiment=rim_pspnet", "sampler=arbs", "loss=ce_ilm"], rim, extra)
    assert main([str(tmp_path)]) == 0
    out = tmp_path / "report"
    rows = list(csv.DictReader((out / "table.csv").read_text().splitlines()))
    assert [r["variant"] for r in rows] == ["sampler=none loss=ce", "sampler=arbs loss=ce_ilm"]
    assert float(rows[1]["mIoU"]) == 42.25 and float(rows[0]["PA"]) == 90.0
    md = (out / "table.md").read_text()
    assert "| sampler=arbs loss=ce_ilm | 91.00 | 57.50 | 42.25 | 48.00 |" in md
    for png in ("per_class_iou.png", "cpa_vs_pixels.png", "gains.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
