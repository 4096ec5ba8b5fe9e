"""The sweep report on a fake multi-seed sweep whose statistics are computed by hand."""

from __future__ import annotations

import csv
import json
import math

import pytest
import yaml
from cfg_utils import CONF
from omegaconf import OmegaConf

from experiments.report import ReportCallback, early_cpa, main, paired, spread
from experiments.variants import describe

NAMES = ["bg", "arm", "hand"]
ARBS_DEFAULTS = OmegaConf.to_container(OmegaConf.load(CONF / "sampler" / "arbs.yaml"))


def _config(net, sampler, ilm, seed, **sampler_keys):
    sampler_cfg = None
    if sampler is not None:
        sampler_cfg = {
            "_target_": "samplers.RegionalBalancedSampler",
            "source": sampler,
            # the config files' own values: only a changed one may show in a name
            **{k: ARBS_DEFAULTS.get(k) for k in ("cpa", "eta", "nrbs_count", "min_prob")},
            **sampler_keys,
        }
    return {
        "model": {"_target_": f"lightning_modules.nets.{net}", "backbone": "lite"},
        "sampler": sampler_cfg,
        # older runs lack loss.main_normalizer / side_target: "not recorded", no crash
        "loss": {
            "main": {"_target_": "losses.CrossEntropyLoss"},
            "ilm": {"_target_": "losses.InterClassLoss", "margin": 1.0} if ilm else None,
            "ilm_weight": 1.0,
            "ilm_region": "all",
        },
        "seed": seed,
        "schedule": {"name": "rim", "stage1_epochs": 2, "total_epochs": 3},
        "paths": {"output_dir": "${hydra:runtime.output_dir}"},
    }


def _scores(pa, recall, precision, miou, iou=None):
    return {
        "PA": pa,
        "MPA": recall,
        "mIoU": miou,
        "mAcc": recall,
        "mRecall": recall,
        "mPrecision": precision,
        "mpa_definition": "recall",
        "IoU": dict(zip(NAMES, iou or [miou, miou, miou], strict=True)),
    }


def _job(root, num, config, val, baseline=None, stage1_dir="/s1/x", extra=None):
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    # The override string says nothing true about the variant: names come from the config.
    (job / ".hydra" / "overrides.yaml").write_text("- experiment=misleading\n- sampler=none\n")
    results = {"schedule": "rim", "val": val, "stage1": {"dir": stage1_dir}, **(extra or {})}
    if baseline is not None:
        results["baseline"] = {"dir": f"{stage1_dir}/baseline", "val": baseline}
    (job / "results.json").write_text(json.dumps(results))


# Per seed: the baseline's mIoU and the variants' mIoU (PA = mIoU + 40, MPAs = mIoU + 10 / + 5).
BASE = [40.0, 42.0, 44.0]
VARIANTS = {
    ("arbs", False): [41.0, 41.0, 44.5],  # differences 1, -1, 0.5
    ("nrbs", False): [40.5, 42.5, 44.5],  # differences 0.5, 0.5, 0.5
    (None, True): [40.0, 42.0, 45.0],  # differences 0, 0, 1
    ("arbs", True): [41.5, 43.0, 46.0],  # differences 1.5, 1, 2
}


def _sweep(root):
    num = 0
    for seed in range(3):
        stage1 = f"/logs/stage1/pspnet-seed{seed}"
        extra = {
            "stage1": {
                "dir": stage1,
                "early_cpa_epoch": 1,
                "early_confusion": [[8, 2, 0], [1, 3, 0], [0, 0, 0]],
            },
            "class_pixel_counts": dict(zip(NAMES, [1000, 100, 10], strict=True)),
            "class_region_counts": dict(zip(NAMES, [16, 9, 2], strict=True)),
        }
        b = BASE[seed]
        for (sampler, ilm), values in VARIANTS.items():
            v = values[seed]
            iou = [v, v + (5.0 if sampler == "arbs" else 0.0), v]
            _job(
                root,
                num,
                _config("PSPNet", sampler, ilm, seed),
                _scores(v + 40, v + 10, v + 5, v, iou),
                _scores(b + 40, b + 10, b + 5, b),
                stage1,
                extra,
            )
            num += 1
    # Another experiment in the same folder: DANet, one seed, RIM with a changed CPA reading.
    other = "precision" if ARBS_DEFAULTS.get("cpa") != "precision" else "recall"
    _job(
        root,
        num,
        _config("DANet", "arbs", True, 0, cpa=other),
        _scores(80.0, 60.0, 55.0, 50.0),
        _scores(79.0, 58.0, 54.0, 48.5),
        "/logs/stage1/danet-seed0",
    )
    return other


def _rows(out):
    rows = list(csv.DictReader((out / "table.csv").read_text().splitlines()))
    return {(r["variant"], r["metric"]): r for r in rows}


def test_fake_sweep_statistics_names_and_pairing(tmp_path):
    other = _sweep(tmp_path)
    assert main([f"sweep={tmp_path}"]) == tmp_path / "report"
    out = tmp_path / "report"
    rows = _rows(out)
    variants = {v for v, _ in rows}
    danet_rim = f"RIM(DANet) [cpa={other}]"
    assert variants == {
        "PSPNet",
        "PSPNet+ARBS",
        "PSPNet+NRBS",
        "PSPNet+ILM",
        "RIM(PSPNet)",
        "DANet",
        danet_rim,
    }
    # Baseline listed once per stage 1: 3 seeds, mIoU 40, 42, 44 -> mean 42, sample std 2.
    base = rows[("PSPNet", "mIoU")]
    assert int(base["seeds"]) == 3
    assert float(base["mean"]) == pytest.approx(42.0) and float(base["std"]) == pytest.approx(2.0)
    assert float(rows[("PSPNet", "PA")]["mean"]) == pytest.approx(82.0)
    assert float(rows[("PSPNet", "MPA (precision)")]["mean"]) == pytest.approx(47.0)
    # RIM mIoU 41.5, 43, 46: mean 43.5, std sqrt(((-2)^2 + 0.5^2 + 2.5^2) / 2) = sqrt(5.25).
    rim = rows[("RIM(PSPNet)", "mIoU")]
    assert float(rim["mean"]) == pytest.approx(43.5)
    assert float(rim["std"]) == pytest.approx(math.sqrt(5.25))
    # Paired differences 1.5, 1, 2: mean 1.5, sd 0.5, t(0.975, 2 dof) = 4.3027 (t table):
    # half-width 4.3027 * 0.5 / sqrt(3) = 1.2421.
    assert float(rim["delta"]) == pytest.approx(1.5)
    assert float(rim["delta_low"]) == pytest.approx(1.5 - 1.2421, abs=1e-3)
    assert float(rim["delta_high"]) == pytest.approx(1.5 + 1.2421, abs=1e-3)
    assert rim["verdict"] == "exceeds seed noise"
    # ARBS: 1, -1, 0.5 -> mean 1/6, sd sqrt(((5/6)^2 + (7/6)^2 + (1/3)^2) / 2) = 1.0408.
    arbs = rows[("PSPNet+ARBS", "mIoU")]
    assert float(arbs["delta"]) == pytest.approx(1 / 6)
    half = 4.3027 * 1.0408 / math.sqrt(3)
    assert float(arbs["delta_high"]) == pytest.approx(1 / 6 + half, abs=2e-3)
    assert arbs["verdict"] == "within seed noise"
    # NRBS: 0.5 every seed -> zero spread, an interval of one point that excludes 0.
    nrbs = rows[("PSPNet+NRBS", "MPA (recall)")]
    assert float(nrbs["delta"]) == pytest.approx(0.5) and nrbs["verdict"] == "exceeds seed noise"
    # DANet is paired with its own baseline (same stage 1), not PSPNet's: 50 - 48.5.
    danet = rows[(danet_rim, "mIoU")]
    assert float(danet["delta"]) == pytest.approx(1.5)
    assert danet["verdict"] == "one seed: no interval" and danet["delta_low"] == ""

    md = (out / "report.md").read_text()
    # Table 1 as the paper's: rows PSPNet, +NRBS, +ARBS with the paper's numbers beside.
    t1 = md.split("### Table 1")[1].split("###")[0]
    lines = [line for line in t1.splitlines() if line.startswith("| PSPNet")]
    assert [line.split("|")[1].strip() for line in lines] == [
        "PSPNet",
        "PSPNet+NRBS",
        "PSPNet+ARBS",
    ]
    assert "paper (MHPv2.0)" in t1 and "72.69 / 52.22 / 37.57" in lines[2]
    assert (
        "| RIM(PSPNet) | 0,1,2 | 83.50 ± 2.29 | 53.50 ± 2.29 | 48.50 ± 2.29 | 43.50 ± 2.29 |" in md
    )
    assert "RIM(PSPNet) vs PSPNet (3 seeds): PA +1.50 points (95% CI +0.26 to +2.74): exceeds" in md
    assert "mIoU +1.50 points (95% CI +0.26 to +2.74): exceeds seed noise." in md
    assert "DANet" not in t1  # no DANet sampler variant: its baseline stays out of Table 1
    # Switches absent from older configs are said to be missing, not guessed.
    assert "not recorded" in md.split("## Switches")[1]
    for png in ("fig2_early_cpa.png", "fig5_arbs_vs_nrbs_iou.png", "fig6_gains.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_statistics_helpers_by_hand():
    s = spread([1.0, 2.0, 6.0])
    assert s.mean == pytest.approx(3.0) and s.std == pytest.approx(math.sqrt(7.0))
    one = paired([0.7])
    assert one.mean == pytest.approx(0.7) and one.low is None
    assert one.verdict == "one seed: no interval"
    # 4 pairs: t(0.975, 3 dof) = 3.1824 (t table); sd of (-1, 0, 1, 2) = sqrt(5/3).
    p = paired([-1.0, 0.0, 1.0, 2.0])
    half = 3.1824 * math.sqrt(5 / 3) / 2
    assert p.low == pytest.approx(0.5 - half, abs=1e-3) and p.verdict == "within seed noise"


def test_early_cpa_both_readings():
    recall, precision = early_cpa([[8, 2, 0], [1, 3, 0], [0, 0, 0]])
    assert recall == [pytest.approx(80.0), pytest.approx(75.0), None]
    assert precision == [pytest.approx(800 / 9), pytest.approx(60.0), None]


def test_names_come_from_the_config():
    frozen = describe(_config("DeepLabV3Plus", None, False, 1), "stage2")
    assert frozen.name() == "DeepLabv3+ (frozen encoder, CE)"
    assert describe(_config("DeepLabV3Plus", "arbs", True, 1), "baseline").name() == "DeepLabv3+"
    assert describe(_config("DANet", "nrbs", True, 1), "stage2").name() == "DANet+NRBS+ILM"
    cols = describe(_config("PSPNet", "arbs", True, 2), "stage2").columns()
    assert cols["variant"] == "RIM(PSPNet)" and cols["seed"] == 2 and cols["network"] == "PSPNet"
    assert cols["cpa"] == ARBS_DEFAULTS.get("cpa", "not recorded")
    assert cols["main_normalizer"] == "not recorded"
    stage1 = describe(_config("PSPNet", "arbs", True, 2), "stage1").columns()
    assert stage1["cpa"] == "n/a" and stage1["sampler"] == "none" and stage1["ilm"] is False


def test_multirun_callback_writes_the_report(tmp_path):
    _sweep(tmp_path)
    ReportCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert "### Table 3" in (tmp_path / "report" / "report.md").read_text()
