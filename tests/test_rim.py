"""The RIM two-stage schedule end to end on the synthetic set."""

from __future__ import annotations

import json
import math

import pytest
import torch
from cfg_utils import TINY, compose_cfg

from run import run

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

    assert main([f"sweep={sweep}"]) == sweep / "report"
    # Named from the jobs' configs: one shared baseline, the ILM-only job and RIM.
    rows = (sweep / "report" / "report.md").read_text().split("## All variants")[1]
    names = [line.split("|")[1].strip() for line in rows.splitlines()[4:] if line.startswith("|")]
    assert names[:3] == ["PSPNet", "PSPNet+ILM", "RIM(PSPNet)"]


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


def _wandb_records(path):
    """The records of an offline W&B run file (``run-<id>.wandb``), parsed with wandb's own
    protobuf schema. The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic, version),
    then 32 KiB blocks of chunks, each ``crc32 (4) | length (2, little-endian) | type (1)``,
    type 1 = a whole record, 2/3/4 = first/middle/last piece of one."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, block, pieces = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the rest of a block too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pieces = chunk if kind in (1, 2) else pieces + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            yield record


def _wandb_run(path):
    """``{"job_type", "group", "name", "config": {...}, "summary": {...}}`` of an offline run."""
    out = {"config": {}, "summary": {}}
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out.update(job_type=run.job_type, group=run.run_group, name=run.display_name)
            out["config"].update({i.key: json.loads(i.value_json) for i in run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "summary":
            out["summary"].update(
                {i.key: json.loads(i.value_json) for i in record.summary.update if i.key}
            )
    return out


@pytest.mark.slow
def test_rim_job_logs_three_wandb_runs_and_fig8(tmp_path, monkeypatch):
    """One RIM job (stage 1, baseline, stage 2) with logger=wandb offline: three W&B runs, each with
    its job type, the experiment as group, the variant's name, seed and switches as config columns
    and both MPA readings in the summary. The report of that folder draws Fig. 8 from the jobs'
    final checkpoints."""
    from omegaconf import OmegaConf

    from experiments.report import write_report

    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_cfg(
        [
            "experiment=quickstart",
            *RIM,
            "data.synthetic.num_val=2",
            "schedule.cpa_epoch=1",
            "logger=wandb",
            "seed=3",
        ],
        tmp_path,
    )
    run(cfg)
    # Hydra would have written the job's config here; compose_cfg runs outside a Hydra job.
    (tmp_path / "run" / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / "run" / ".hydra" / "config.yaml")

    files = sorted(p for p in tmp_path.rglob("offline-run-*/run-*.wandb") if "latest" not in str(p))
    runs = {r["job_type"]: r for r in map(_wandb_run, files)}
    assert len(files) == 3 and set(runs) == {"stage1", "baseline", "stage2"}
    assert {r["group"] for r in runs.values()} == {"quickstart"}
    assert runs["stage1"]["name"] == "PSPNet stage 1 seed=3"
    assert runs["baseline"]["name"] == "PSPNet seed=3"
    assert runs["stage2"]["name"] == "RIM(PSPNet) seed=3"
    stage2 = runs["stage2"]["config"]
    assert stage2["variant"] == "RIM(PSPNet)" and stage2["seed"] == 3
    assert stage2["sampler"] == "arbs" and stage2["ilm"] is True and stage2["network"] == "PSPNet"
    assert runs["baseline"]["config"]["sampler"] == "none"
    assert stage2["cfg"]["loss"]["ilm_weight"] == 1.0  # the whole resolved config too
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    for job_type, scores in (("stage2", results["val"]), ("baseline", results["baseline"]["val"])):
        summary = runs[job_type]["summary"]
        assert summary["final/mIoU"] == pytest.approx(scores["mIoU"])
        assert summary["final/MPA_recall"] == pytest.approx(scores.get("mRecall", scores["mAcc"]))
        if scores.get("mPrecision") is not None:
            assert summary["final/MPA_precision"] == pytest.approx(scores["mPrecision"])
    # Validation examples went out as W&B segmentation masks.
    stage2_dir = next(p.parent for p in files if "stage2" in str(p))
    assert len(list((stage2_dir / "files" / "media").rglob("examples_*.mask.png"))) == 2

    out = write_report(tmp_path / "run", images=2)
    png = (out / "fig8_examples.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "RIM(PSPNet)" in (out / "report.md").read_text()
