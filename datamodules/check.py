"""Scan an LV-MHP-v2 folder: sample counts, class pixel histogram and every bad file.

Usage::

    python -m datamodules.check --root data/LV-MHP-v2 [--split train,val] [--num-classes 59]
    python -m datamodules.check data.root=data/LV-MHP-v2          # Hydra-style overrides work too

Exit code 1 if any problem was found (missing/unreadable files, bad label values, size mismatches).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from datamodules.batch import DatasetError
from datamodules.mhp import MHP_CLASSES, MHPv2Dataset

# Hydra-style keys accepted as "key=value" and their argparse flags.
_HYDRA_KEYS = {
    "data.root": "--root",
    "root": "--root",
    "data.num_classes": "--num-classes",
    "num_classes": "--num-classes",
    "split": "--split",
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
    parser.add_argument("--root", required=True, help="the LV-MHP-v2 folder")
    parser.add_argument("--split", default="train,val", help="comma-separated splits")
    parser.add_argument("--num-classes", type=int, default=len(MHP_CLASSES))
    parser.add_argument("--threads", type=int, default=None, help="decoding threads")
    args = sys.argv[1:] if argv is None else list(argv)
    return parser.parse_args(_translate_hydra_args(args))


def histogram_table(counts: np.ndarray, title: str) -> Table:
    """Rich table of class id, name, pixels and share of all labelled pixels."""
    total = max(int(counts.sum()), 1)
    table = Table(title=title)
    table.add_column("id", justify="right")
    table.add_column("class")
    table.add_column("pixels", justify="right")
    table.add_column("%", justify="right")
    for cls, n in enumerate(counts):
        name = MHP_CLASSES[cls] if cls < len(MHP_CLASSES) else str(cls)
        table.add_row(str(cls), name, f"{int(n):,}", f"{100.0 * n / total:.3f}")
    return table


def check(
    root: str,
    splits: Sequence[str],
    num_classes: int = len(MHP_CLASSES),
    threads: int | None = None,
    console: Console | None = None,
) -> int:
    """Scan ``splits`` under ``root`` and print the report.

    Returns:
        The number of problems found (0 = clean).
    """
    console = console or Console()
    problems: list[str] = []
    total = np.zeros(num_classes, dtype=np.int64)
    for split in splits:
        try:
            ds = MHPv2Dataset(root, split, skip_bad=True, num_classes=num_classes)
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
            console.print(histogram_table(result.counts, f"{split}: label pixels per class"))
    if len(splits) > 1 and total.any():
        console.print(histogram_table(total, "all splits: label pixels per class"))
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
    return 1 if check(args.root, splits, args.num_classes, args.threads) else 0


if __name__ == "__main__":
    sys.exit(main())
