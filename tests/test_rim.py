"""The RIM two-stage schedule end to end on the synthetic set."""

from __future__ import annotations

import json
import math

import pytest
import torch
from cfg_utils import TINY, compose_cfg

from experiments.train import run

RIM = [
    *TINY,
    "schedule=rim",
    "schedule.total_epochs=3",
    "schedule.stage1_epochs=2",
    "schedule.cpa_epoch=1",
    "sampler=arbs",
    "loss=ce_ilm",
    "schedule.baseline=true",
]


@pytest.mark.slow
def test_two_stage_run(tmp_path):
    cfg = compose_cfg(["experiment=quickstart", *RIM], tmp_path)
    results = run(cfg)
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["schedule"] == "rim"
    assert on_disk["baseline"]["val"]["mIoU"] is not None and on_disk["val"]["mIoU"] is not None

    stage1 = torch.load(results["stage1"]["checkpoint"], map_location="cpu", weights_only=False)
    stage2 = torch.load(
        tmp_path / "run" / "stage2" / "checkpoints" / "last.ckpt",
        map_location="cpu",
        weights_only=False,
    )
    s1, s2 = stage1["state_dict"], stage2["state_dict"]

    # Stage 2: every encoder weight and BatchNorm statistic unchanged, the decoder trained.
    encoder = [k for k in s1 if k.startswith("net.backbone.")]
    assert any("running_mean" in k for k in encoder)
    for key in encoder:
        assert torch.equal(s1[key], s2[key]), key
    decoder = [
        k
        for k in s1
        if k.startswith("net.")
        and not k.startswith("net.backbone.")
        and k.endswith("weight")
        and "aux" not in k
    ]
    assert decoder and any(not torch.equal(s1[k], s2[k]) for k in decoder)

    # Keep probabilities = eta / CPA of epoch 1, recomputed by hand from the confusion matrix in
    # the stage-1 checkpoint: recall (correct / ground-truth pixels), the default reading.
    confusion = s1["early_confusion"].tolist()
    assert on_disk["stage1"]["early_confusion"] == confusion
    assert int(s1["early_cpa_epoch"]) == 1
    n = len(confusion)
    rows = [sum(confusion[i]) for i in range(n)]
    cpa = [confusion[i][i] / rows[i] if rows[i] else math.nan for i in range(n)]
    positive = [x for x in cpa if not math.isnan(x) and x > 0]
    eta = min(positive)
    expected = [1.0 if (math.isnan(x) or x <= 0) else eta / x for x in cpa]
    got = list(on_disk["sampling"]["keep_probabilities"].values())
    assert got == pytest.approx(expected, rel=1e-5)
    assert max(got) == pytest.approx(1.0)
    sampling = on_disk["sampling"]
    assert sampling["cpa"] == "recall" and sampling["eta"] == "min"
    # the expected kept share: sum_i s_i n_i / sum_i n_i over the training pixel counts
    counts = list(on_disk["class_pixel_counts"].values())
    share = sum(p * c for p, c in zip(expected, counts, strict=True)) / sum(counts)
    assert sampling["expected_kept_share"] == pytest.approx(share, rel=1e-5)
    # both MPA readings in every scores entry
    for entry in (on_disk["val"], on_disk["baseline"]["val"]):
        assert entry["mpa_definition"] == "recall" and entry["MPA"] == entry["mRecall"]
        assert entry["mRecall"] == entry["mAcc"] and entry["mPrecision"] is not None
    # The sampler state travels with the stage-2 checkpoint (resume keeps the same probabilities).
    assert torch.allclose(
        s2["sampler.probs"].double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5
    )

    # Stage 2's learning rate continues the 3-epoch cosine curve at epoch 2.
    from lightning_modules.schedulers import cosine_factor

    csv_file = next((tmp_path / "run" / "stage2").rglob("metrics.csv"))
    lines = csv_file.read_text().splitlines()
    col = lines[0].split(",").index("lr-SGD")
    lrs = [float(r.split(",")[col]) for r in lines[1:] if r.split(",")[col]]
    steps = 16 // 4
    expected_lrs = [0.02 * cosine_factor(2 * steps + i, 3 * steps) for i in range(steps)]
    assert lrs == pytest.approx(expected_lrs, rel=1e-6)


@pytest.mark.slow
def test_multirun_shares_stage1_and_reports(tmp_path):
    """`run.py -m` over samplers: one stage 1 and one baseline for all jobs, then the report."""
    import subprocess
    import sys

    from cfg_utils import ROOT

    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        str(ROOT / "run.py"),
        "-m",
        "experiment=quickstart",
        *RIM,
        "sampler=none,arbs",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.parent.name for p in sweep.glob("*/results.json"))
    assert jobs == ["0", "1"]
    stage1_runs = [p for p in (tmp_path / "logs" / "stage1").iterdir() if p.is_dir()]
    assert len(stage1_runs) == 1
    assert (stage1_runs[0] / "baseline" / "done.json").is_file()
    assert (
        proc.stderr.count("training shared stage 1") + proc.stdout.count("training shared stage 1")
        == 1
    )

    from experiments.report import main

    assert main([str(sweep)]) == 0
    md = (sweep / "report" / "table.md").read_text()
    assert md.count("baseline") == 1 and "sampler=arbs" in md and "sampler=none" in md


@pytest.mark.slow
def test_optuna_sweep_runs_trials_on_one_stage1(tmp_path):
    """hparams_search=rim_optuna end to end: two trials share stage 1; Optuna's best is the best
    trial's val/mIoU from its results.json."""
    import subprocess
    import sys

    import yaml
    from cfg_utils import ROOT

    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        str(ROOT / "run.py"),
        "experiment=quickstart",
        "hparams_search=rim_optuna",
        *RIM,
        "schedule.baseline=false",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=1",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]
    assert len(trials) == 2
    assert len([p for p in (tmp_path / "logs" / "stage1").iterdir() if p.is_dir()]) == 1
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(t["val"]["mIoU"] for t in trials))
    assert set(best["best_params"]) == {"loss.ilm_weight", "loss.ilm.margin", "sampler.min_prob"}
