"""Turns a sweep's results into the RIM paper's tables and figures.

    python -m experiments.report logs/rim_pspnet/multiruns/<date>_<time> [--out DIR]

Reads every ``results.json`` below the folder (one per job) and the job's Hydra overrides, and writes
to ``DIR`` (default: ``<sweep>/report``):

- ``table.md`` / ``table.csv``: PA, MPA, mIoU, mAcc per variant (the paper's Tables 1-3);
- ``per_class_iou.png``: per-class IoU of the variants side by side (Fig. 5);
- ``cpa_vs_pixels.png``: early-epoch CPA against class pixel counts (Fig. 2), when recorded;
- ``gains.png``: PA / MPA / mIoU gains of each variant over the baseline, per network (Fig. 6).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

METRICS = ("PA", "MPA", "mIoU", "mAcc")
# Overrides that say which variant a job is; the rest (paths, seeds, ...) are shared.
_VARIANT_KEYS = ("model", "sampler", "loss", "schedule")


@dataclass
class Variant:
    """One job of a sweep."""

    name: str
    directory: Path
    results: dict[str, Any]
    overrides: dict[str, str] = field(default_factory=dict)

    @property
    def val(self) -> dict[str, Any]:
        return self.results.get("val") or {}

    @property
    def network(self) -> str:
        return self.overrides.get("model", "default")


def _overrides(job_dir: Path) -> dict[str, str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    items = yaml.safe_load(path.read_text()) or []
    out = {}
    for item in items:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = value
    return out


def collect(sweep_dir: Path) -> list[Variant]:
    """Every job below ``sweep_dir`` that wrote a ``results.json``, sorted by job folder."""
    variants = []
    seen_baselines: set[str] = set()
    for path in sorted(Path(sweep_dir).rglob("results.json")):
        if "stage1" in path.parts:
            continue
        job = path.parent
        results = json.loads(path.read_text())
        overrides = _overrides(job)
        varying = [f"{k}={overrides[k]}" for k in _VARIANT_KEYS if k in overrides]
        name = " ".join(varying) or job.name
        variants.append(Variant(name, job, results, overrides))
        baseline = results.get("baseline") or {}
        # Jobs sharing a stage 1 share its baseline too: list it once.
        key = str(baseline.get("dir") or job)
        if baseline.get("val") and key not in seen_baselines:
            seen_baselines.add(key)
            variants.append(
                Variant(
                    "baseline" + (f" model={overrides['model']}" if "model" in overrides else ""),
                    job,
                    results["baseline"],
                    {**overrides, "sampler": "none", "loss": "ce", "schedule": "single"},
                )
            )
    # Keep only the overrides that differ between jobs in the names.
    if len(variants) > 1:
        for key in _VARIANT_KEYS:
            values = {v.overrides.get(key) for v in variants}
            if len(values) == 1:
                for v in variants:
                    v.name = " ".join(p for p in v.name.split() if not p.startswith(f"{key}="))
    for v in variants:
        v.name = v.name or v.directory.name
    return variants


def _fmt(value: Any) -> str:
    return (
        "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"
    )


def write_tables(variants: list[Variant], out: Path) -> str:
    """Writes table.md and table.csv; returns the Markdown."""
    lines = ["| variant | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for v in variants:
        lines.append(f"| {v.name} | " + " | ".join(_fmt(v.val.get(m)) for m in METRICS) + " |")
    md = "\n".join(lines) + "\n"
    (out / "table.md").write_text(md)
    with open(out / "table.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["variant", "directory", *METRICS])
        for v in variants:
            writer.writerow([v.name, str(v.directory), *(v.val.get(m) for m in METRICS)])
    return md


def _baseline(variants: list[Variant], network: str) -> Variant | None:
    # The paper's baseline (the whole schedule on the natural distribution) first, then a plain
    # CE variant of the same network.
    ordered = sorted(variants, key=lambda v: v.overrides.get("schedule") != "single")
    for v in ordered:
        if v.network == network and (
            v.overrides.get("sampler", "none") == "none" and v.overrides.get("loss", "ce") == "ce"
        ):
            return v
    return None


def plot_all(variants: list[Variant], out: Path) -> list[Path]:
    """Writes the PNG figures that the results support; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    with_iou = [v for v in variants if v.val.get("IoU")]
    if with_iou:
        names = list(with_iou[0].val["IoU"])
        keep = [n for n in names if any(v.val["IoU"].get(n) is not None for v in with_iou)]
        x = np.arange(len(keep))
        width = 0.8 / len(with_iou)
        fig, ax = plt.subplots(figsize=(max(8, 0.35 * len(keep) * len(with_iou)), 4.5))
        for i, v in enumerate(with_iou):
            vals = [v.val["IoU"].get(n) if v.val["IoU"].get(n) is not None else 0.0 for n in keep]
            ax.bar(x + i * width, vals, width, label=v.name)
        ax.set_xticks(x + 0.4 - width / 2, keep, rotation=90, fontsize=7)
        ax.set_ylabel("IoU (%)")
        ax.set_title("per-class IoU")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "per_class_iou.png", dpi=120)
        plt.close(fig)
        written.append(out / "per_class_iou.png")

    for v in variants:
        cpa = (v.results.get("stage1") or {}).get("early_cpa")
        counts = v.results.get("class_pixel_counts")
        if cpa and counts:
            names = [n for n in cpa if cpa[n] is not None and counts.get(n)]
            order = sorted(names, key=lambda n: -counts[n])
            fig, ax1 = plt.subplots(figsize=(max(8, 0.22 * len(order)), 4.5))
            ax1.plot(
                range(len(order)), [counts[n] for n in order], color="green", label="pixels (train)"
            )
            ax1.set_yscale("log")
            ax1.set_ylabel("training pixels")
            ax2 = ax1.twinx()
            ax2.plot(
                range(len(order)), [100 * cpa[n] for n in order], color="orange", label="early CPA"
            )
            ax2.set_ylabel("CPA (%)")
            ax1.set_xticks(range(len(order)), order, rotation=90, fontsize=6)
            ax1.set_title("class pixel count vs CPA of the early stage-1 epoch")
            fig.tight_layout()
            fig.savefig(out / "cpa_vs_pixels.png", dpi=120)
            plt.close(fig)
            written.append(out / "cpa_vs_pixels.png")
            break

    gains = []
    for v in variants:
        base = _baseline(variants, v.network)
        if base is None or base is v:
            continue
        delta = [(v.val.get(m) or 0.0) - (base.val.get(m) or 0.0) for m in ("PA", "MPA", "mIoU")]
        gains.append((v.name, delta))
    if gains:
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(gains)), 4))
        x = np.arange(len(gains))
        for i, metric in enumerate(("PA", "MPA", "mIoU")):
            ax.bar(x + i * 0.27, [g[1][i] for g in gains], 0.27, label=metric)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(x + 0.27, [g[0] for g in gains], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("gain over baseline (points)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "gains.png", dpi=120)
        plt.close(fig)
        written.append(out / "gains.png")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun folder (or any folder of runs)")
    parser.add_argument(
        "--out", type=Path, default=None, help="where to write (default: <sweep>/report)"
    )
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir}: no such folder")
    variants = collect(args.sweep_dir)
    if not variants:
        parser.error(f"{args.sweep_dir}: no results.json below this folder")
    out = args.out or args.sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    print(write_tables(variants, out))
    for path in plot_all(variants, out):
        print(f"wrote {path}")
    print(f"wrote {out / 'table.md'} and {out / 'table.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
