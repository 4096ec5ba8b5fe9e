"""Turns a sweep's results into the RIM paper's tables and figures, over seeds.

    python -m experiments.report sweep=logs/<task>/multiruns/<date>_<time> [out=DIR] [images=N]

Reads every job's ``results.json`` and resolved config (``.hydra/config.yaml``) below the folder.
Each fit is named by what it is (:mod:`experiments.variants`: ``PSPNet``, ``PSPNet+ARBS``,
``RIM(PSPNet)``), whatever experiment or override string started it; jobs sharing a stage 1 list its
baseline once. Writes to ``DIR`` (default ``<sweep>/report``):

- ``report.md`` (also ``table.md``): Tables 1-3 laid out as the paper's (rows = method; PA, MPA under
  both readings, mIoU; mean +- sample standard deviation over seeds; the paper's MHPv2.0 numbers
  beside), every variant's paired difference to its baseline (same network, seed and stage 1) with a
  95% t-interval and whether it exceeds seed noise, and the switches of every variant;
- ``table.csv``: the same numbers, one row per variant and metric;
- ``fig2_early_cpa.png``: early stage-1 CPA (recall and precision) against training sample counts;
- ``fig5_arbs_vs_nrbs_iou.png``: per-class IoU of ARBS and NRBS where they differ most;
- ``fig6_gains.png``: each variant's gain over its baseline, per network;
- ``fig8_examples.png`` (``images=N``): image, ground truth, baseline and RIM on N validation
  images, predicted from the jobs' final checkpoints.

``hydra.callbacks`` can run it at the end of a multirun (:class:`ReportCallback`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig

from datamodules.cli import command
from datamodules.errors import ConfigError
from datamodules.files import atomic_path, atomic_write
from experiments.variants import SWITCHES, Variant, describe

log = logging.getLogger(__name__)

#: (column, scores key): PA, MPA under both readings, mIoU (mRecall equals mmseg's mAcc).
METRICS: tuple[tuple[str, str], ...] = (
    ("PA", "PA"),
    ("MPA (recall)", "mRecall"),
    ("MPA (precision)", "mPrecision"),
    ("mIoU", "mIoU"),
)
PAPER_LABEL = "paper (MHPv2.0)"
# The paper's tables (PA, MPA, mIoU in %). Its MPA averages eq. 4's CPA; Table 2's DeepLabv3+
# baseline differs from Table 3's in the paper itself.
PAPER: dict[str, dict[str, tuple[float, float, float]]] = {
    "Table 1": {
        "PSPNet": (71.84, 45.18, 35.92),
        "PSPNet+NRBS": (72.02, 53.06, 36.77),
        "PSPNet+ARBS": (72.69, 52.22, 37.57),
    },
    "Table 2": {
        "DeepLabv3+": (71.67, 44.56, 34.98),
        "DeepLabv3++ILM": (72.29, 45.45, 35.70),
        "PSPNet": (71.84, 45.18, 35.92),
        "PSPNet+ILM": (72.56, 46.03, 36.27),
        "DANet": (72.06, 45.92, 36.51),
        "DANet+ILM": (72.74, 46.08, 36.64),
    },
    "Table 3": {
        "DeepLabv3+": (71.93, 44.88, 35.49),
        "RIM(DeepLabv3+)": (72.64, 50.95, 36.85),
        "PSPNet": (71.84, 45.18, 35.92),
        "RIM(PSPNet)": (72.91, 51.59, 37.75),
        "DANet": (72.06, 45.92, 36.51),
        "RIM(DANet)": (72.85, 51.90, 37.84),
    },
}
# Rows of each table, per network: the method names (experiments.variants.Variant.method).
TABLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "Table 1": ("balanced samplers: NRBS vs ARBS", ("{net}", "{net}+NRBS", "{net}+ARBS")),
    "Table 2": ("the inter-class loss", ("{net}", "{net}+ILM")),
    "Table 3": ("RIM against the baseline", ("{net}", "RIM({net})")),
}
NETWORK_ORDER = ("DeepLabv3+", "PSPNet", "DANet")


@dataclass
class Fit:
    """One scored fit of a sweep.

    Attributes:
        variant: what it is.
        scores: its validation scores entry (results.json ``val`` or ``baseline.val``).
        job: the job folder it came from.
        stage1_dir: its shared stage 1 (the pairing key with network and seed).
        results: the job's whole results.json.
        config: the job's resolved config.
    """

    variant: Variant
    scores: dict[str, Any]
    job: Path
    stage1_dir: str | None
    results: dict[str, Any]
    config: dict[str, Any]

    @property
    def pair_key(self) -> tuple[str, Any, str | None]:
        return (self.variant.network, self.variant.seed, self.stage1_dir)


def load_config(job: Path) -> dict[str, Any]:
    """The job's ``.hydra/config.yaml`` as a plain dict ({} when absent)."""
    path = job / ".hydra" / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def collect(sweep_dir: Path) -> list[Fit]:
    """Every scored fit below ``sweep_dir``: each job's stage 2 (or one-stage run) and, once per
    stage 1, the baseline continued from it."""
    fits: list[Fit] = []
    seen_baselines: set[tuple[Any, ...]] = set()
    for path in sorted(Path(sweep_dir).rglob("results.json")):
        job = path.parent
        if "stage1" in path.relative_to(sweep_dir).parts or job.name == "report":
            continue
        results = json.loads(path.read_text())
        config = load_config(job)
        stage1_dir = (results.get("stage1") or {}).get("dir")
        schedule = config.get("schedule") or {}
        stage1_only = results.get("schedule") == "rim" and schedule.get("stage") == 1
        # A stage-1-only job scored no variant, and an evaluation-only job rescored a checkpoint
        # trained elsewhere: neither is a stage-2 fit of its config.
        if results.get("val") and not stage1_only and config.get("train", True) is not False:
            role = "stage2" if results.get("schedule") == "rim" else "train"
            fits.append(
                Fit(describe(config, role), results["val"], job, stage1_dir, results, config)
            )
        baseline = results.get("baseline") or {}
        if baseline.get("val"):
            fit = Fit(
                describe(config, "baseline"), baseline["val"], job, stage1_dir, results, config
            )
            # Jobs sharing a stage 1 share its baseline: list it once.
            key = (*fit.pair_key, baseline.get("dir"))
            if key not in seen_baselines:
                seen_baselines.add(key)
                fits.append(fit)
    return fits


def metric(scores: dict[str, Any], key: str) -> float | None:
    """``scores[key]``; ``mRecall`` falls back to ``mAcc`` and ``mPrecision`` to the confusion
    matrix (classes that were predicted), for results written before both readings were stored."""
    value = scores.get(key)
    if value is None and key == "mRecall":
        value = scores.get("mAcc")
    if value is None and key == "mPrecision" and "mpa_definition" not in scores:
        # Older results stored the precision reading under MPA without saying so.
        value = scores.get("MPA")
    if value is None and key == "mPrecision" and scores.get("confusion"):
        cm = scores["confusion"]
        cols = [sum(row[j] for row in cm) for j in range(len(cm))]
        per = [100.0 * cm[j][j] / c for j, c in enumerate(cols) if c > 0]
        value = sum(per) / len(per) if per else None
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


# ---------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation (n - 1) of one metric over seeds."""

    mean: float | None
    std: float | None
    n: int


@dataclass(frozen=True)
class Paired:
    """Mean paired difference (variant - baseline, same seed and stage 1) and its 95% t-interval
    (None with fewer than two pairs)."""

    mean: float | None
    low: float | None
    high: float | None
    n: int

    @property
    def verdict(self) -> str:
        if self.n == 0:
            return "no baseline to pair with"
        if self.n == 1:
            return "one seed: no interval"
        if self.low > 0 or self.high < 0:
            return "exceeds seed noise"
        return "within seed noise"


def spread(values: Sequence[float]) -> Spread:
    """Mean and sample standard deviation of ``values`` (std None for fewer than two)."""
    n = len(values)
    if n == 0:
        return Spread(None, None, 0)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return Spread(mean, std, n)


def paired(differences: Sequence[float], confidence: float = 0.95) -> Paired:
    """Mean of ``differences`` with a two-sided t-interval on n - 1 degrees of freedom."""
    from scipy.stats import t

    s = spread(differences)
    if s.n < 2:
        return Paired(s.mean, None, None, s.n)
    half = float(t.ppf(0.5 + confidence / 2, s.n - 1)) * s.std / math.sqrt(s.n)
    return Paired(s.mean, s.mean - half, s.mean + half, s.n)


# ---------------------------------------------------------------------- grouping


@dataclass
class Group:
    """The fits of one variant over seeds, and their baselines."""

    name: str
    fits: list[Fit]
    baselines: list[Fit | None]

    @property
    def variant(self) -> Variant:
        return self.fits[0].variant

    def spread(self, key: str) -> Spread:
        return spread([v for f in self.fits if (v := metric(f.scores, key)) is not None])

    def paired(self, key: str) -> Paired:
        diffs = []
        for fit, base in zip(self.fits, self.baselines, strict=True):
            a = metric(fit.scores, key)
            b = metric(base.scores, key) if base is not None else None
            if a is not None and b is not None:
                diffs.append(a - b)
        return paired(diffs)


def group(fits: list[Fit]) -> list[Group]:
    """Fits grouped by variant name, in order of first appearance, each with its baselines.

    A switch without a default that differs between fits of the same method (e.g. two backbones)
    goes into the names, so different configurations never share a row.
    """
    by_method: dict[tuple[bool, str], list[Fit]] = defaultdict(list)
    for fit in fits:
        by_method[(fit.variant.role == "baseline", fit.variant.method)].append(fit)
    names: dict[int, str] = {}
    for members in by_method.values():
        varying = [
            s.column
            for s in SWITCHES
            if len({dict(f.variant.switches).get(s.column) for f in members}) > 1
            and s.column not in dict(members[0].variant.defaults)
        ]
        for fit in members:
            extra = {c: dict(fit.variant.switches).get(c) for c in varying}
            names[id(fit)] = fit.variant.name(extra)
    baselines = {f.pair_key: f for f in fits if f.variant.role == "baseline"}
    groups: dict[str, Group] = {}
    for fit in fits:
        name = names[id(fit)]
        g = groups.setdefault(name, Group(name, [], []))
        g.fits.append(fit)
        base = None if fit.variant.role == "baseline" else baselines.get(fit.pair_key)
        g.baselines.append(base)
    nets = _networks(list(groups.values()))
    # Per network, the baseline first; otherwise in the order the sweep ran them.
    return sorted(
        groups.values(),
        key=lambda g: (nets.index(g.variant.network), g.variant.role != "baseline"),
    )


# ---------------------------------------------------------------------- tables


def _num(value: float | None, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.2f}" if sign else f"{value:.2f}"


def _mean_std(s: Spread) -> str:
    if s.mean is None:
        return "-"
    return f"{s.mean:.2f} ± {s.std:.2f}" if s.std is not None else f"{s.mean:.2f}"


def _interval(p: Paired) -> str:
    if p.mean is None:
        return "-"
    if p.low is None:
        return f"{p.mean:+.2f}"
    return f"{p.mean:+.2f} [{p.low:+.2f}, {p.high:+.2f}]"


def _networks(groups: list[Group]) -> list[str]:
    present = {g.variant.network for g in groups}
    return [n for n in NETWORK_ORDER if n in present] + sorted(present - set(NETWORK_ORDER))


def _seeds(g: Group) -> str:
    seeds = sorted({f.variant.seed for f in g.fits}, key=str)
    return ",".join(str(s) for s in seeds)


def paper_tables(groups: list[Group]) -> tuple[str, set[str]]:
    """Tables 1-3 as Markdown, and the names of the groups they show."""
    cols = [c for c, _ in METRICS]
    head = ["method", "seeds", *cols, f"{PAPER_LABEL}: PA / MPA / mIoU"]
    lines, shown = [], set()
    for table, (title, rows) in TABLES.items():
        body = []
        for net in _networks(groups):
            net_rows, has_variant = [], False
            for pattern in rows:
                method = pattern.format(net=net)
                is_base = pattern == "{net}"
                for g in groups:
                    if g.variant.method != method or (g.variant.role == "baseline") != is_base:
                        continue
                    ref = PAPER[table].get(method)
                    paper = " / ".join(f"{x:.2f}" for x in ref) if ref else "-"
                    cells = [_mean_std(g.spread(k)) for _, k in METRICS]
                    net_rows.append((g.name, _row([g.name, _seeds(g), *cells, paper])))
                    has_variant |= not is_base
            # A network's baseline alone does not make rows of a table.
            if has_variant:
                body += [r for _, r in net_rows]
                shown.update(n for n, _ in net_rows)
        if body:
            lines += [f"### {table}: {title}", "", _row(head), _rule(len(head)), *body, ""]
    return "\n".join(lines), shown


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _rule(n: int) -> str:
    return "|" + "---|" * n


def variants_table(groups: list[Group], names: set[str] | None = None) -> str:
    """Every group (or those in ``names``) with mean ± std per metric."""
    head = ["variant", "seeds", *(c for c, _ in METRICS)]
    rows = [
        _row([g.name, _seeds(g), *(_mean_std(g.spread(k)) for _, k in METRICS)])
        for g in groups
        if names is None or g.name in names
    ]
    return "\n".join([_row(head), _rule(len(head)), *rows]) + "\n"


def differences(groups: list[Group]) -> tuple[str, list[str]]:
    """The paired-difference table (Markdown) and one sentence per variant and metric."""
    head = ["variant", "baseline", "pairs", *(f"Δ {c} [95% CI]" for c, _ in METRICS)]
    rows, words = [], []
    for g in groups:
        if g.variant.role == "baseline":
            continue
        bases = sorted({b.variant.method for b in g.baselines if b is not None})
        cells = [g.paired(k) for _, k in METRICS]
        n = max(p.n for p in cells)
        rows.append(_row([g.name, ", ".join(bases) or "-", str(n), *map(_interval, cells)]))
        said = []
        for (col, _), p in zip(METRICS, cells, strict=True):
            if p.mean is not None:
                ci = "" if p.low is None else f" (95% CI {p.low:+.2f} to {p.high:+.2f})"
                said.append(f"{col} {p.mean:+.2f} points{ci}: {p.verdict}")
        if said:
            seeds = f"{n} seed{'s' if n != 1 else ''}"
            words.append(f"- {g.name} vs {', '.join(bases)} ({seeds}): " + "; ".join(said) + ".")
    return "\n".join([_row(head), _rule(len(head)), *rows]) + "\n", words


def settings_table(groups: list[Group]) -> str:
    """The switches of every variant ("not recorded" where an older run lacks the key)."""
    cols = [s.column for s in SWITCHES] + ["mpa"]
    head = ["variant", *cols]
    rows = []
    for g in groups:
        values = g.variant.columns()
        rows.append(_row([g.name, *(str(values.get(c)) for c in cols)]))
    return "\n".join([_row(head), _rule(len(head)), *rows]) + "\n"


def write_tables(groups: list[Group], out: Path) -> str:
    """Writes report.md, table.md (the same) and table.csv (:func:`table_csv`); returns the
    Markdown."""
    paper, shown = paper_tables(groups)
    diff_md, words = differences(groups)
    others = {g.name for g in groups} - shown
    parts = [
        "# RIM ablation report",
        "",
        "Validation scores in %, mean ± sample standard deviation over seeds. MPA (recall) averages "
        "correct / ground-truth pixels per class (= mAcc), MPA (precision) correct / predicted "
        f"pixels (eq. 4 as written). The {PAPER_LABEL} column is the paper's reference, not this "
        "run.",
        "",
        paper or "(no variant of Tables 1-3 in this sweep)",
    ]
    if others:
        parts += ["### Other variants", "", variants_table(groups, others)]
    parts += [
        "## Paired differences to the baseline",
        "",
        "Variant minus baseline of the same network, seed and stage 1, in points; 95% t-interval "
        "over seeds (n - 1 degrees of freedom).",
        "",
        diff_md,
        *words,
        "",
        "## All variants",
        "",
        variants_table(groups),
        "## Switches",
        "",
        settings_table(groups),
    ]
    md = "\n".join(parts)
    atomic_write(out / "report.md", md)
    atomic_write(out / "table.md", md)
    atomic_write(out / "table.csv", table_csv(groups))
    return md


def table_csv(groups: list[Group]) -> str:
    """table.csv: one row per variant and metric (mean, std, paired difference, verdict)."""
    handle = io.StringIO(newline="")
    writer = csv.writer(handle)
    writer.writerow(
        [
            "variant",
            "method",
            "network",
            "seeds",
            "metric",
            "mean",
            "std",
            "delta",
            "delta_low",
            "delta_high",
            "verdict",
        ]
    )
    for g in groups:
        for col, key in METRICS:
            s, p = g.spread(key), g.paired(key)
            is_base = g.variant.role == "baseline"
            writer.writerow(
                [
                    g.name,
                    g.variant.method,
                    g.variant.network,
                    s.n,
                    col,
                    s.mean,
                    s.std,
                    None if is_base else p.mean,
                    None if is_base else p.low,
                    None if is_base else p.high,
                    "" if is_base else p.verdict,
                ]
            )
    return handle.getvalue()


# ---------------------------------------------------------------------- figures


def early_cpa(confusion: Sequence[Sequence[int]]) -> tuple[list[float | None], list[float | None]]:
    """Per-class recall (cm[i,i] / row i) and precision (cm[i,i] / column i) of a confusion matrix
    (rows = ground truth) in %, None where the denominator is zero."""
    c = len(confusion)
    rows = [sum(confusion[i]) for i in range(c)]
    cols = [sum(confusion[r][j] for r in range(c)) for j in range(c)]
    recall = [100.0 * confusion[i][i] / rows[i] if rows[i] else None for i in range(c)]
    precision = [100.0 * confusion[i][i] / cols[i] if cols[i] else None for i in range(c)]
    return recall, precision


def _mean_over(values: list[list[float | None]]) -> list[float | None]:
    out = []
    for column in zip(*values, strict=True):
        present = [v for v in column if v is not None]
        out.append(sum(present) / len(present) if present else None)
    return out


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> Path:
    """Writes ``fig`` as ``path`` (PNG, 120 dpi, atomically) and closes it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return path


def fig2_early_cpa(fits: list[Fit], out: Path) -> Path | None:
    """Early stage-1 CPA under both readings against training region and pixel counts, per class
    sorted by region count (one network: the first with an early confusion matrix), averaged over
    its stage-1 runs."""
    by_stage1: dict[str, Fit] = {}
    for f in fits:
        s1 = f.results.get("stage1") or {}
        if s1.get("early_confusion") and f.stage1_dir not in by_stage1:
            by_stage1[f.stage1_dir] = f
    if not by_stage1:
        return None
    network = next(iter(by_stage1.values())).variant.network
    chosen = [f for f in by_stage1.values() if f.variant.network == network]
    names = list(chosen[0].scores.get("IoU") or {})
    recalls, precisions = zip(
        *(early_cpa(f.results["stage1"]["early_confusion"]) for f in chosen), strict=True
    )
    recall, precision = _mean_over(list(recalls)), _mean_over(list(precisions))
    if len(names) != len(recall):
        names = [str(i) for i in range(len(recall))]
    regions = chosen[0].results.get("class_region_counts") or {}
    pixels = chosen[0].results.get("class_pixel_counts") or {}
    order = sorted(range(len(names)), key=lambda i: -(regions.get(names[i]) or 0))
    plt = _plt()
    fig, ax1 = plt.subplots(figsize=(max(8, 0.22 * len(order)), 4.8))
    x = list(range(len(order)))
    if regions:
        ax1.bar(x, [regions.get(names[i]) or 0 for i in order], color="green", alpha=0.35)
        ax1.set_ylabel("training images with the class (bars)")
    if pixels:
        axp = ax1.twinx()
        axp.plot(x, [max(pixels.get(names[i]) or 0, 1) for i in order], color="green", ls="--")
        axp.set_yscale("log")
        axp.set_yticks([])
    ax2 = ax1.twinx()
    ep = (chosen[0].results.get("stage1") or {}).get("early_cpa_epoch", "early")
    for values, label, colour in ((recall, "recall", "orange"), (precision, "precision", "blue")):
        ax2.plot(x, [values[i] for i in order], color=colour, marker=".", label=f"CPA ({label})")
    ax2.set_ylabel("CPA of the stage-1 training batches (%)")
    ax2.legend(loc="upper right", fontsize=7)
    ax1.set_xticks(x, [names[i] for i in order], rotation=90, fontsize=6)
    ax1.set_title(f"{network}: CPA of stage-1 epoch {ep} vs training sample counts (Fig. 2)")
    fig.tight_layout()
    return _save(plt, fig, out / "fig2_early_cpa.png")


def _mean_iou(g: Group) -> dict[str, float]:
    per: dict[str, list[float]] = defaultdict(list)
    for f in g.fits:
        for name, v in (f.scores.get("IoU") or {}).items():
            if v is not None:
                per[name].append(float(v))
    return {n: sum(v) / len(v) for n, v in per.items()}


def fig5_arbs_vs_nrbs(groups: list[Group], out: Path, top: int = 12) -> Path | None:
    """Per-class IoU of ARBS and NRBS (first network with both) on the ``top`` classes where their
    seed means differ most."""
    for net in _networks(groups):
        arbs = next((g for g in groups if g.variant.method == f"{net}+ARBS"), None)
        nrbs = next((g for g in groups if g.variant.method == f"{net}+NRBS"), None)
        if arbs and nrbs:
            break
    else:
        return None
    a, b = _mean_iou(arbs), _mean_iou(nrbs)
    common = sorted(set(a) & set(b), key=lambda n: -abs(a[n] - b[n]))[:top]
    if not common:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(common)), 4.2))
    x = list(range(len(common)))
    ax.bar([i - 0.2 for i in x], [b[n] for n in common], 0.4, label=nrbs.name)
    ax.bar([i + 0.2 for i in x], [a[n] for n in common], 0.4, label=arbs.name)
    ax.set_xticks(x, common, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("IoU (%)")
    ax.set_title("ARBS vs NRBS: classes with the largest IoU difference (Fig. 5)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(plt, fig, out / "fig5_arbs_vs_nrbs_iou.png")


def fig6_gains(groups: list[Group], out: Path) -> Path | None:
    """One panel per metric: each variant's mean paired gain over its baseline with the 95%
    interval as error bar, variants of one network side by side."""
    rows = [g for g in groups if g.variant.role != "baseline" and g.paired("mIoU").n > 0]
    if not rows:
        return None
    rows.sort(key=lambda g: _networks(groups).index(g.variant.network))
    plt = _plt()
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 4.2), sharey=False)
    colours = {n: f"C{i}" for i, n in enumerate(_networks(groups))}
    for ax, (col, key) in zip(axes, METRICS, strict=True):
        stats = [g.paired(key) for g in rows]
        means = [p.mean or 0.0 for p in stats]
        err = [[0 if p.low is None else p.mean - p.low for p in stats]] * 2
        ax.bar(
            range(len(rows)),
            means,
            yerr=err,
            capsize=3,
            color=[colours[g.variant.network] for g in rows],
        )
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(rows)), [g.name for g in rows], rotation=45, ha="right", fontsize=7)
        ax.set_title(f"Δ {col} (points)")
    fig.suptitle("gain over the baseline, per network (Fig. 6); bars: 95% interval over seeds")
    fig.tight_layout()
    return _save(plt, fig, out / "fig6_gains.png")


def _checkpoint(path: Any) -> Path | None:
    return Path(path) if path and Path(path).is_file() else None


def predict_examples(rim: Fit, images: int) -> list[tuple[Any, Any, Any, Any]]:
    """``(image, ground truth, baseline prediction, RIM prediction)`` for the first ``images``
    validation batches of ``rim``'s job, from the final checkpoints of its baseline and stage 2.

    Rebuilds the job's datamodule and network from its resolved config (``.hydra/config.yaml``),
    so it needs the job's data where the job found it.
    """
    import torch
    from omegaconf import OmegaConf, open_dict

    from datamodules.batch import network_batch
    from experiments.build import build_datamodule, build_module
    from experiments.keys import stage1_overrides
    from lightning_modules.dashboard import validation_example

    base_dir = (rim.results.get("baseline") or {}).get("dir")
    base_ckpt = _checkpoint(base_dir and Path(base_dir) / "checkpoints" / "final.ckpt")
    rim_ckpt = _checkpoint((rim.results.get("checkpoints") or {}).get("last")) or _checkpoint(
        rim.job / "stage2" / "checkpoints" / "last.ckpt"
    )
    if base_ckpt is None or rim_ckpt is None:
        log.warning("Fig. 8: no final checkpoints of %s's baseline and stage 2", rim.job)
        return []
    cfg = OmegaConf.create(rim.config)
    with open_dict(cfg):
        # ${hydra:...} does not resolve outside the job: its folder is known.
        cfg.paths.output_dir = str(rim.job)
        cfg.paths.work_dir = str(rim.job)
    datamodule = build_datamodule(cfg)
    datamodule.setup("validate")
    module = build_module(cfg, stage1_overrides(cfg)).eval()
    # One-image batches: validation_example draws the first image of a batch.
    batches: list[dict[str, Any]] = []
    for batch in datamodule.val_dataloader():
        batch = network_batch(batch)
        for i in range(len(batch["image"])):
            batches.append(
                {
                    k: v[i : i + 1]
                    for k, v in batch.items()
                    if isinstance(v, torch.Tensor | list | tuple)
                }
            )
        if len(batches) >= images:
            break
    batches = batches[:images]
    predictions: dict[Path, list[Any]] = {}
    for ckpt in (base_ckpt, rim_ckpt):
        module.load_init_weights(str(ckpt))
        with torch.no_grad():
            predictions[ckpt] = [validation_example(module, b) for b in batches]
    return [
        (img, gt, base[2], pred)
        for (img, gt, pred), base in zip(predictions[rim_ckpt], predictions[base_ckpt], strict=True)
    ]


def fig8_examples(groups: list[Group], out: Path, images: int) -> Path | None:
    """A grid of validation images: image, ground truth, baseline, RIM (Fig. 8), from the first
    RIM job of the first network that has one."""
    import numpy as np

    from lightning_modules.dashboard import palette

    rim = next(
        (
            f
            for net in _networks(groups)
            for g in groups
            if g.variant.method == f"RIM({net})"
            for f in g.fits
        ),
        None,
    )
    if rim is None or images <= 0:
        return None
    examples = predict_examples(rim, images)
    if not examples:
        return None
    data = rim.config.get("data") or {}
    colours = np.asarray(data.get("palette") or palette(int(data.get("num_classes") or 256)))
    colours = colours.astype(np.uint8)

    def paint(ids: Any) -> Any:
        shown = np.where(ids == 255, 0, ids)  # ignored pixels in the background colour
        return colours[shown]

    plt = _plt()
    fig, axes = plt.subplots(len(examples), 4, figsize=(8, 2.1 * len(examples)), squeeze=False)
    titles = ("image", "ground truth", "baseline", rim.variant.name())
    for row, (img, gt, base, ours) in zip(axes, examples, strict=True):
        panels = (img, paint(gt), paint(base), paint(ours))
        for ax, panel, title in zip(row, panels, titles, strict=True):
            ax.imshow(panel)
            ax.set_axis_off()
            ax.set_title(title, fontsize=8)
    fig.suptitle(f"{rim.variant.network}, seed {rim.variant.seed} (Fig. 8)", fontsize=9)
    fig.tight_layout()
    return _save(plt, fig, out / "fig8_examples.png")


def plot_all(fits: list[Fit], groups: list[Group], out: Path, images: int = 0) -> list[Path]:
    """Writes the figures that the results support; returns their paths."""
    made = [
        fig2_early_cpa(fits, out),
        fig5_arbs_vs_nrbs(groups, out),
        fig6_gains(groups, out),
        fig8_examples(groups, out, images),
    ]
    return [p for p in made if p is not None]


def write_report(sweep_dir: Path, out: Path | None = None, images: int = 0) -> Path:
    """Writes the report of ``sweep_dir`` to ``out`` (default ``<sweep>/report``); returns ``out``.

    Raises:
        ConfigError: ``sweep_dir`` is not a folder, or holds no results.json with scores.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ConfigError(f"sweep={sweep_dir}: no such folder")
    fits = collect(sweep_dir)
    if not fits:
        raise ConfigError(f"sweep={sweep_dir}: no results.json with scores below this folder")
    out = Path(out) if out is not None else sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    groups = group(fits)
    print(write_tables(groups, out))
    for path in plot_all(fits, groups, out, images):
        print(f"wrote {path}")
    print(f"wrote {out / 'report.md'} and {out / 'table.csv'}")
    return out


def _hydra_callback_base() -> type:
    try:
        from hydra.experimental.callback import Callback
    except ImportError:  # pragma: no cover - Hydra is a dependency; keep the report importable
        return object
    return Callback


class ReportCallback(_hydra_callback_base()):
    """Hydra callback that writes the report when a multirun ends (``hydra.callbacks``).

    Args:
        images: validation images in Fig. 8 (0: no Fig. 8).
    """

    def __init__(self, images: int = 0) -> None:
        self.images = images

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        log.info("writing the report of %s", sweep_dir)
        write_report(sweep_dir, images=self.images)


def report(cfg: DictConfig) -> Path:
    """The command on a composed ``conf/report.yaml``; returns the report's folder."""
    from omegaconf import OmegaConf

    if OmegaConf.is_missing(cfg, "sweep") or not cfg.sweep:
        raise ConfigError("missing sweep=<multirun folder> (python -m experiments.report --help)")
    return write_report(Path(str(cfg.sweep)), cfg.out and Path(str(cfg.out)), int(cfg.images))


main = command("report", report)

if __name__ == "__main__":
    main()
