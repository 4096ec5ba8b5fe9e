"""Lightning's own cost per training step: a 1-parameter module under a Trainer vs a hand loop.

    python bench/lightning_floor.py [--steps 400] [--rounds 3]

The step does no work (one multiply, backward, SGD), so what a Trainer adds shows: the bare loop,
then with the Rich progress bar, then with an LR monitor, a checkpoint callback and a CSV logger.
CPU time of this process (one thread), so a machine shared with other jobs adds little.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar


class _One(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def training_step(self, batch, batch_idx):
        return (self.w * batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class _Timer(pl.Callback):
    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps, self.start, self.end = warmup, steps, 0.0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self.start = time.process_time()
        if batch_idx == self.warmup + self.steps:
            self.end = time.process_time()


class _Ones:
    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        return iter([torch.ones(2)] * self.n)

    def __len__(self) -> int:
        return self.n


def lightning_ms(steps: int, variant: str, warmup: int = 10) -> float:
    timer = _Timer(warmup, steps)
    callbacks: list[pl.Callback] = [timer]
    if variant == "progress_bar":
        callbacks.append(RichProgressBar())
    if variant == "monitor_checkpoint_logger":
        callbacks += [LearningRateMonitor("step"), ModelCheckpoint(dirpath=tempfile.mkdtemp())]
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=(
            pl.loggers.CSVLogger(tempfile.mkdtemp())
            if variant == "monitor_checkpoint_logger"
            else False
        ),
        enable_checkpointing=variant == "monitor_checkpoint_logger",
        enable_progress_bar=variant == "progress_bar",
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(_One(), train_dataloaders=_Ones(warmup + steps + 1))
    return 1000 * (timer.end - timer.start) / steps


def hand_ms(steps: int) -> float:
    w = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([w], lr=0.01, momentum=0.9)
    x = torch.ones(2)
    start = time.process_time()
    for _ in range(steps):
        opt.zero_grad()
        (w * x).sum().backward()
        opt.step()
    return 1000 * (time.process_time() - start) / steps


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    variants = ("bare", "progress_bar", "monitor_checkpoint_logger")
    rounds: dict[str, list[float]] = {k: [] for k in ("hand", *variants)}
    for _ in range(args.rounds):
        rounds["hand"].append(hand_ms(args.steps))
        for variant in variants:
            rounds[variant].append(lightning_ms(args.steps, variant))
    medians = {k: sorted(v)[len(v) // 2] for k, v in rounds.items()}
    print(json.dumps({"ms_per_step_median": medians, "rounds": rounds}, indent=2))
    return medians


if __name__ == "__main__":
    main()
