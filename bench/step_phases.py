"""Where a training step's time goes: rimlab's Lightning step and the hand loop, phase by phase.

    python bench/step_phases.py --stage 1 --override model=pspnet_lite     # CPU, one thread
    python bench/step_phases.py --stage 2 --override model=pspnet_lite --override module.nonfinite=off

The same module, batches and hand loop as ``bench/train_step.py`` (its ``build_bench`` and
``stage_hand_step``), on the CPU only: the phases are timed on the host with the process's CPU time,
which on a GPU would measure kernel launches, not kernels. One hand step runs after every rimlab
step inside the same fit (both see the same load). Each phase is the CPU time between two marks:
Lightning's hooks and the optimizer's step hooks for rimlab (``batch start`` ... ``batch end``, then
the batch-end hooks, the scheduler and the next batch up to the next step's start), the start of
each of forward, loss, ``zero_grad``, backward and the optimizer update for the hand loop. The
phases of a step add up to its time; the JSON has the mean and the median of each phase (the means
add up) and the totals.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning.pytorch as pl  # noqa: E402
from omegaconf import open_dict  # noqa: E402
from train_step import ROOT, _Batches, bench_trainer, build_bench, stage_hand_step  # noqa: E402

# rimlab's marks in step order; a phase runs from a mark to the next (the last to the next step's
# first) and is named by its start mark.
RIMLAB_PHASES = {
    "batch_start": "Lightning: batch-start hooks, optimizer loop up to optimizer.step",
    "optimizer_step": "Lightning: optimizer.step up to the closure's training_step",
    "training_step": "module: training_step up to the net",
    "net": "net forward",
    "net_end": "module: sampler and glue up to the loss",
    "loss": "loss",
    "loss_end": "module: step log (loss terms kept on the device)",
    "training_step_end": "Lightning: closure result, zero_grad",
    "backward": "backward",
    "backward_end": "Lightning: after backward, on_before_optimizer_step hooks",
    "optimizer_update": "optimizer update (and Lightning's gradient clipping hook)",
    "optimizer_step_end": "Lightning: after optimizer.step, scheduler, up to on_train_batch_end",
    "batch_end": "Lightning: callbacks' on_train_batch_end",
    "read": "module: on_train_batch_end (a read every log_every_n_steps, weights check)",
    "read_end": "Lightning: logging, next batch",
}
HAND_PHASES = {
    "forward": "net forward",
    "loss": "loss",
    "zero_grad": "zero_grad",
    "backward": "backward",
    "optimizer": "optimizer update",
}
CLOCK = time.process_time


class _Marks:
    """``(step, name, CPU time)`` records of one variant."""

    def __init__(self) -> None:
        self.step = 0
        self.records: list[tuple[int, str, float]] = []

    def __call__(self, name: str) -> None:
        self.records.append((self.step, name, CLOCK()))

    def by_step(self) -> dict[int, dict[str, float]]:
        out: dict[int, dict[str, float]] = {}
        for step, name, t in self.records:
            out.setdefault(step, {})[name] = t
        return out


def instrument(module: pl.LightningModule, marks: _Marks) -> list[Any]:
    """Wraps the module's ``training_step``, ``backward`` and ``on_train_batch_end`` (its reads
    of the step log) and hooks its net and loss so that each marks its start and end, and its
    ``on_before_optimizer_step`` to mark the update's start; returns the hook handles."""
    handles = [
        module.net.register_forward_pre_hook(lambda *a: marks("net")),
        module.net.register_forward_hook(lambda *a: marks("net_end")),
        module.loss.register_forward_pre_hook(lambda *a: marks("loss")),
        module.loss.register_forward_hook(lambda *a: marks("loss_end")),
    ]

    def wrap(name: str, start: str, end: str) -> None:
        inner = getattr(module, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            marks(start)
            out = inner(*args, **kwargs)
            marks(end)
            return out

        setattr(module, name, wrapped)

    wrap("training_step", "training_step", "training_step_end")
    wrap("backward", "backward", "backward_end")
    wrap("on_train_batch_end", "read", "read_end")
    inner = module.on_before_optimizer_step

    def before_update(*args: Any, **kwargs: Any) -> Any:
        out = inner(*args, **kwargs)
        marks("optimizer_update")  # Lightning's gradient clipping hook, then the update
        return out

    module.on_before_optimizer_step = before_update
    return handles


class _PhaseCallback(pl.Callback):
    """First callback of the fit: marks the batch start and end, hooks the optimizer's step and
    runs one hand step after each rimlab step (outside rimlab's phases)."""

    def __init__(self, marks: _Marks, hand_marks: _Marks, hand_step) -> None:
        self.marks, self.hand_marks, self.hand_step = marks, hand_marks, hand_step

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            optimizer.register_step_pre_hook(lambda *a: self.marks("optimizer_step"))
            optimizer.register_step_post_hook(lambda *a: self.marks("optimizer_step_end"))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.marks.step = batch_idx
        self.marks("batch_start")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.marks("batch_end")
        self.hand_marks.step = batch_idx
        self.hand_step()
        self.marks("hand_done")


def phase_times(
    by_step: dict[int, dict[str, float]],
    order: list[str],
    steps: range,
    resume: dict[str, str] | None = None,
    end: str | None = None,
) -> tuple[dict[str, list[float]], list[float]]:
    """Seconds of each phase (``order[i]`` up to ``order[i + 1]``; the last up to the step's
    ``end`` mark, or without one the next step's ``order[0]``) and each step's total, over
    ``steps``. ``resume`` (``{phase: mark}``) starts those phases at that later mark instead of
    their own (the time in between, the other variant's step, is left out)."""
    resume = resume or {}
    phases: dict[str, list[float]] = {name: [] for name in order}
    totals = []
    for s in steps:
        m = by_step[s]
        last = m[end] if end is not None else by_step[s + 1][order[0]]
        ends = [m[n] for n in order[1:]] + [last]
        starts = [m[resume.get(n, n)] for n in order]
        for name, a, b in zip(order, starts, ends, strict=True):
            phases[name].append(b - a)
        totals.append(sum(b - a for a, b in zip(starts, ends, strict=True)))
    return phases, totals


def _summary(phases: dict[str, list[float]], labels: dict[str, str]) -> dict[str, dict]:
    return {
        name: {
            "what": labels[name],
            "mean_ms": 1000 * statistics.mean(v),
            "median_ms": 1000 * statistics.median(v),
        }
        for name, v in phases.items()
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--override", action="append", default=[], help="Hydra override")
    parser.add_argument("--stage", type=int, default=1, choices=(1, 2))
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300, help="timed steps")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--as-run",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="rimlab's Trainer as run.py builds it: callbacks, progress bar, CSV logger (default)",
    )
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "phases.json")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1")
    args.precision, args.channels_last = "32", False
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    cfg, module, net_copy, batches, aux_weight = build_bench(args, device)
    marks, hand_marks = _Marks(), _Marks()
    instrument(module, marks)
    built: list[Any] = []

    def hand() -> None:
        if not built:  # inside the fit: stage 2's sampler copy needs the statistics of fit start
            built.append(
                stage_hand_step(
                    args, cfg, module, net_copy, batches, device, aux_weight, hand_marks
                )
            )
        built[0]()

    callback = _PhaseCallback(marks, hand_marks, hand)
    total = args.warmup + args.steps + 1  # the last step's phases end at the next step's start
    run_cfg = None
    if args.as_run:
        run_cfg = cfg.copy()
        with open_dict(run_cfg):
            run_cfg.paths.output_dir = str(args.data_dir / "step_phases_run")
    trainer = bench_trainer(run_cfg, device, "32", total, callback, first=True)
    loader = _Batches([batches[i % len(batches)] for i in range(total)])
    trainer.fit(module, train_dataloaders=loader)

    timed = range(args.warmup, args.warmup + args.steps)
    rimlab, rimlab_totals = phase_times(
        marks.by_step(), list(RIMLAB_PHASES), timed, resume={"batch_end": "hand_done"}
    )
    hand, hand_totals = phase_times(hand_marks.by_step(), list(HAND_PHASES), timed, end="end")
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rimlab": _summary(rimlab, RIMLAB_PHASES),
        "hand": _summary(hand, HAND_PHASES),
        "total_ms": {
            "rimlab": {
                "mean": 1000 * statistics.mean(rimlab_totals),
                "median": 1000 * statistics.median(rimlab_totals),
            },
            "hand": {
                "mean": 1000 * statistics.mean(hand_totals),
                "median": 1000 * statistics.median(hand_totals),
            },
        },
    }
    print(f"{'rimlab phase':<72} {'mean ms':>8} {'median':>8}")
    for row in result["rimlab"].values():
        print(f"{row['what']:<72} {row['mean_ms']:>8.3f} {row['median_ms']:>8.3f}")
    print(f"{'hand phase':<72} {'mean ms':>8} {'median':>8}")
    for row in result["hand"].values():
        print(f"{row['what']:<72} {row['mean_ms']:>8.3f} {row['median_ms']:>8.3f}")
    t = result["total_ms"]
    print(
        f"step: rimlab {t['rimlab']['mean']:.2f} ms, hand {t['hand']['mean']:.2f} ms (means), "
        f"rimlab - hand {t['rimlab']['mean'] - t['hand']['mean']:+.2f} ms"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
