"""Scan a dataset folder: sample counts, class pixel histogram and every bad file.

Usage::

    python -m datamodules.check data.root=data/LV-MHP-v2 [split=[train,val]] [data.num_classes=59]
    python -m datamodules.check data=lip data.root=/datasets/LIP
    python -m datamodules.check data=cityscapes data.root=/datasets/cityscapes split=val

The options are ``conf/check.yaml`` (``--help`` lists them), composed by Hydra as ``run.py``'s are
(:mod:`datamodules.cli`): ``data=`` names a parsing dataset config of ``conf/data/`` (mhp_v2, lip,
cityscapes, nyudv2, ...) and ``data.<key>=`` overrides its keys; the dataset is read exactly as
training reads it, with bad samples collected instead of raised.

Exit code 1 if any problem was found (missing/unreadable files, bad label values, size mismatches);
a dataset that cannot be opened at all ends as one paragraph with exit code 1, no traceback
(``HYDRA_FULL_ERROR=1`` shows it).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, open_dict
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from datamodules.base import ParsingDataModule
from datamodules.batch import DatasetError
from datamodules.cli import command


def datamodule_for(data: DictConfig) -> ParsingDataModule:
    """The datamodule of a composed ``data`` config, skipping (and recording) bad samples.

    Class names and colours are dropped when their count differs from ``num_classes`` (a
    ``data.num_classes=`` override), and a synthetic set is never generated: the check reads what
    is on disk.
    """
    data = data.copy()
    with open_dict(data):
        data.skip_bad = True
        names = data.get("class_names")
        if names is not None and len(names) != data.num_classes:
            data.class_names, data.palette = None, None
        if "synthetic" in data:
            data.synthetic = None
    return instantiate(data, _convert_="all")


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
    datamodule: ParsingDataModule,
    splits: Sequence[str],
    threads: int | None = None,
    console: Console | None = None,
) -> int:
    """Scan ``splits`` of ``datamodule`` (:func:`datamodule_for`) and print the report.

    Returns:
        The number of problems found (0 = clean).
    """
    console = console or Console()
    problems: list[str] = []
    num_classes, names = datamodule.num_classes, datamodule.class_names
    total = np.zeros(num_classes, dtype=np.int64)
    for split in splits:
        try:
            ds = datamodule.make_dataset(split, None)
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


def splits_of(split: str | Sequence[str]) -> list[str]:
    """``[train, val]``, ``val`` or ``"train,val"`` -> ``["train", "val"]``."""
    names = [split] if isinstance(split, str) else list(split)
    return [s.strip() for name in names for s in str(name).split(",") if s.strip()]


def check_command(cfg: DictConfig) -> int:
    """The command on a composed ``conf/check.yaml``: 1 when a problem was found, else 0."""
    split = list(cfg.split) if isinstance(cfg.split, ListConfig) else str(cfg.split)
    problems = check(datamodule_for(cfg.data), splits_of(split), cfg.threads)
    return 1 if problems else 0


main = command("check", check_command)

if __name__ == "__main__":
    sys.exit(main())
