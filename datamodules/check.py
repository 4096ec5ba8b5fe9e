"""Scan a dataset folder: sample counts, class pixel histogram and every bad file.

Usage::

    python -m datamodules.check --root data/LV-MHP-v2 [--split train,val] [--num-classes 59]
    python -m datamodules.check data=lip data.root=/datasets/LIP          # Hydra-style keys too
    python -m datamodules.check --data cityscapes --root /datasets/cityscapes --split train,val

``--data`` names a parsing dataset config of ``conf/data/`` (mhp_v2, lip, cityscapes, nyudv2, ...);
the dataset is read exactly as training reads it, with bad samples collected instead of raised.

Exit code 1 if any problem was found (missing/unreadable files, bad label values, size mismatches);
a dataset that cannot be opened at all ends as one paragraph with exit code 1, no traceback
(``HYDRA_FULL_ERROR=1`` shows it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import OmegaConf
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from datamodules.base import ParsingDataModule
from datamodules.batch import DatasetError
from datamodules.errors import run_command

CONF_DATA = Path(__file__).resolve().parents[1] / "conf" / "data"

# Hydra-style keys accepted as "key=value" and their argparse flags.
_HYDRA_KEYS = {
    "data.root": "--root",
    "root": "--root",
    "data.num_classes": "--num-classes",
    "num_classes": "--num-classes",
    "split": "--split",
    "data": "--data",
}


def _translate_hydra_args(argv: Sequence[str]) -> list[str]:
    out: list[str] = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and not arg.startswith("-") and key.lstrip("+") in _HYDRA_KEYS:
            out += [_HYDRA_KEYS[key.lstrip("+")], value]
        else:
            out.append(arg)
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m datamodules.check", description=__doc__)
    parser.add_argument("--data", default="mhp_v2", help="a conf/data/ name (default mhp_v2)")
    parser.add_argument("--root", required=True, help="the dataset folder")
    parser.add_argument("--split", default="train,val", help="comma-separated splits")
    parser.add_argument("--num-classes", type=int, default=None, help="default: the config's")
    parser.add_argument("--threads", type=int, default=None, help="decoding threads")
    args = sys.argv[1:] if argv is None else list(argv)
    return parser.parse_args(_translate_hydra_args(args))


def datamodule_for(data: str, root: str, num_classes: int | None = None) -> ParsingDataModule:
    """The datamodule of ``conf/data/<data>.yaml`` on ``root``, skipping (and recording) bad samples."""
    path = CONF_DATA / f"{data}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONF_DATA.glob("*.yaml"))
        raise SystemExit(f"--data {data}: no conf/data/{data}.yaml (known: {', '.join(known)})")
    cfg = OmegaConf.load(path)
    cfg.root, cfg.skip_bad = str(root), True
    if num_classes is not None:
        cfg.num_classes = int(num_classes)
        if cfg.get("class_names") is not None and len(cfg.class_names) != num_classes:
            cfg.class_names, cfg.palette = None, None
    if "synthetic" in cfg:
        cfg.synthetic = None  # check what is on disk, never generate
    return instantiate(cfg, _convert_="all")


def histogram_table(counts: np.ndarray, title: str, names: Sequence[str] = ()) -> Table:
    """Rich table of class id, name, pixels and share of all labelled pixels."""
    total = max(int(counts.sum()), 1)
    table = Table(title=title)
    table.add_column("id", justify="right")
    table.add_column("class")
    table.add_column("pixels", justify="right")
    table.add_column("%", justify="right")
    for cls, n in enumerate(counts):
        name = names[cls] if cls < len(names) else str(cls)
        table.add_row(str(cls), name, f"{int(n):,}", f"{100.0 * n / total:.3f}")
    return table


def check(
    root: str,
    splits: Sequence[str],
    num_classes: int | None = None,
    threads: int | None = None,
    console: Console | None = None,
    data: str = "mhp_v2",
) -> int:
    """Scan ``splits`` of dataset ``data`` under ``root`` and print the report.

    Returns:
        The number of problems found (0 = clean).
    """
    console = console or Console()
    problems: list[str] = []
    dm = datamodule_for(data, root, num_classes)
    num_classes, names = dm.num_classes, dm.class_names
    total = np.zeros(num_classes, dtype=np.int64)
    for split in splits:
        try:
            ds = dm.make_dataset(split, None)
        except DatasetError as e:  # the split itself is unusable (missing folder, empty list)
            problems.append(f"[{split}] {e}")
            console.print(f"[red]{escape(split)}: {escape(str(e))}")
            continue
        result = ds.scan(num_classes, decode_images=True, num_threads=threads)
        listed = len(ds) + len(ds.bad_samples)
        console.print(
            f"[bold]{escape(split)}[/]: {listed} listed, {result.num_ok} good, "
            f"{len(result.problems)} bad, labels: {'yes' if ds.has_labels else 'no'}"
        )
        problems += [f"[{split}] {msg}" for msg in result.problems.values()]
        if result.counts is not None:
            total += result.counts
            console.print(histogram_table(result.counts, f"{split}: label pixels per class", names))
    if len(splits) > 1 and total.any():
        console.print(histogram_table(total, "all splits: label pixels per class", names))
    if problems:
        console.print(f"[red bold]{len(problems)} problem(s):")
        for msg in problems:
            console.print(f"  {msg}", markup=False, highlight=False, soft_wrap=True)
    else:
        console.print("[green]no problems found")
    return len(problems)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    splits = [s.strip() for s in args.split.split(",") if s.strip()]
    return 1 if check(args.root, splits, args.num_classes, args.threads, data=args.data) else 0


if __name__ == "__main__":
    # A dataset that cannot be read at all (no split to scan) is one paragraph and exit status 1.
    sys.exit(run_command(main))
