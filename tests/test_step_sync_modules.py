"""The pose and Deep-MAC training steps keep their loss terms on the device (``StepLog``): a step
makes no host transfer and no ``self.log`` call; the logged ``train/<term>_step`` / ``_epoch``
values are the ones Lightning's ``self.log(on_step=True, on_epoch=True)`` wrote; a non-finite
step is named, before validation sees its weights, on every rank alike."""

from __future__ import annotations

import contextlib
import csv
import math
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from test_deepmac import _tiny_deepmac
from torch import nn

from lightning_modules.deepmac import DeepMACLitModule
from lightning_modules.pose import PoseRegressionLitModule
from lightning_modules.step_state import LOSS, StepLog, read_step_log
from losses.centernet import CentreHeatmapLoss
from losses.mask import MaskLoss
from losses.pose import JointL2Loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 5  # training batches per epoch
POSE_SIZES = (3, 2, 3, 2, 1)  # persons per batch
DEEPMAC_COUNTS = ((2, 1), (0, 0), (1, 3), (2, 0), (1,))  # instances per image of each batch


class _Recorded(nn.Module):
    """The wrapped loss, keeping each call's terms (detached; read by the test afterwards)."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.inner = loss
        self.calls: list[dict[str, torch.Tensor]] = []

    def forward(self, *args: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.inner(*args)
        self.calls.append({k: v.detach().clone() for k, v in out.items()})
        return out


def _pose_batch(i: int, poison: int | None = None) -> dict:
    g = torch.Generator().manual_seed(i)
    b = POSE_SIZES[i]
    batch = {
        "image": torch.randn(b, 3, 8, 8, generator=g),
        "target": torch.randn(b, 16, 2, generator=g),
        "labelled": (torch.rand(b, 16, generator=g) > 0.2).float(),
    }
    if i == poison:
        batch["target"][0, 0, 0] = math.nan
        batch["labelled"][0, 0] = 1.0  # an unlabelled joint's NaN would be masked out
    return batch


def _deepmac_batch(i: int, poison: int | None = None) -> dict:
    g = torch.Generator().manual_seed(i)
    boxes, masks, labels = [], [], []
    for n in DEEPMAC_COUNTS[i]:
        xy = torch.rand(n, 2, generator=g) * 16
        boxes.append(torch.cat([xy, xy + 8 + torch.rand(n, 2, generator=g) * 8], 1))
        masks.append((torch.rand(n, 32, 32, generator=g) > 0.5).float())
        labels.append(torch.randint(1, 3, (n,), generator=g))
    image = torch.randn(len(DEEPMAC_COUNTS[i]), 3, 32, 32, generator=g)
    if i == poison:
        image[0, 0, 3, 3] = math.nan
    return {"image": image, "boxes": boxes, "masks": masks, "labels": labels}


def _batch_size(kind: str, i: int) -> int:
    """The ``batch_size`` the module logged with: persons, or ``max(instances, 1)``."""
    return POSE_SIZES[i] if kind == "pose" else max(sum(DEEPMAC_COUNTS[i]), 1)


def _module(kind: str, reference: bool = False) -> pl.LightningModule:
    """A tiny pose (L2 loss weighted 0.5: ``loss != loss/l2``) or Deep-MAC (BCE + 0.5 dice)
    module with a recorded loss; ``reference``: also logging each term as ``ref/<term>`` with
    ``self.log(on_step=True, on_epoch=True)``, as the modules did before their StepLog."""
    torch.manual_seed(0)
    sgd = partial(torch.optim.SGD, lr=0.01)
    if kind == "pose":
        net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.Unflatten(1, (16, 2)))
        cls, args = PoseRegressionLitModule, (net, _Recorded(JointL2Loss(weight=0.5)), sgd)
    else:
        cls, args = DeepMACLitModule, (_tiny_deepmac(), _Recorded(MaskLoss(None, 0.5)), sgd)
    if not reference:
        return cls(*args)

    class Reference(cls):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            n = batch["target"].shape[0] if kind == "pose" else sum(len(x) for x in batch["labels"])
            for name, value in self.loss.calls[-1].items():
                self.log(
                    f"ref/{name}", value.float(), on_step=True, on_epoch=True, batch_size=n or 1
                )
            return loss

    return Reference(*args)


class _Sized(torch.utils.data.Dataset):
    """``STEPS`` ready-made batches (loaded with ``batch_size=None``)."""

    def __init__(self, make, poison: int | None = None) -> None:
        self.make, self.poison = make, poison

    def __len__(self) -> int:
        return STEPS

    def __getitem__(self, i: int) -> dict:
        return self.make(i, self.poison)


class _Unsized(torch.utils.data.IterableDataset):
    """The same batches from a loader without a length."""

    def __init__(self, make, poison: int | None = None) -> None:
        self.make, self.poison = make, poison

    def __iter__(self):
        return (self.make(i, self.poison) for i in range(STEPS))


def _loader(kind: str, sized: bool = True, poison: int | None = None):
    make = _pose_batch if kind == "pose" else _deepmac_batch
    data = (_Sized if sized else _Unsized)(make, poison)
    return torch.utils.data.DataLoader(data, batch_size=None)


def _trainer(tmp_path: Path, log_every: int, callbacks: list, epochs: int = 1) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        log_every_n_steps=log_every,
        logger=pl.loggers.CSVLogger(tmp_path, name="csv"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )


# ---------------------------------------------------------------------- no sync, no self.log


class _StepGuard(pl.Callback):
    """From each batch's start to the callbacks' batch end (before the module's own
    ``on_train_batch_end``, where it reads its StepLog): forward, loss, backward and the optimizer
    step run under ``no_host_sync``, and ``self.log`` is refused (a value given to it stays in
    Lightning's results, accumulated with a few small kernels and Python every step)."""

    def __init__(self, no_host_sync) -> None:
        self.no_host_sync = no_host_sync
        self.stack: contextlib.ExitStack | None = None
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        def refuse(*args, **kwargs):
            raise AssertionError(f"self.log{args[1:2]} in a training step")

        self.stack = contextlib.ExitStack()
        self.stack.enter_context(self.no_host_sync())
        patch = self.stack.enter_context(pytest.MonkeyPatch.context())
        patch.setattr(pl.LightningModule, "log", refuse)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.close()
        self.steps += 1

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.close()  # before the trainer's teardown moves the module to the CPU

    def close(self) -> None:
        if self.stack is not None:
            self.stack.close()
            self.stack = None


@pytest.mark.parametrize("kind", ["pose", "deepmac", "deepmac_centre"])
def test_training_step_makes_no_host_transfer(kind, tmp_path, no_host_sync):
    """One epoch, log_every_n_steps=2: every step (logging steps included) runs without a
    tensor -> host conversion and without self.log; the terms still reach the logger.
    ``deepmac_centre``: with the all-class centre-heatmap loss every Deep-MAC config trains with
    (its targets are built on the device)."""
    if kind == "deepmac_centre":
        torch.manual_seed(0)
        module = DeepMACLitModule(
            _tiny_deepmac(num_centre_classes=2),
            MaskLoss(None, 0.5),
            partial(torch.optim.SGD, lr=0.01),
            centre_loss=CentreHeatmapLoss(class_ids=[1, 2]),
        )
        kind = "deepmac"
    else:
        module = _module(kind)
    guard = _StepGuard(no_host_sync)
    try:
        _trainer(tmp_path, 2, [guard]).fit(module, train_dataloaders=_loader(kind))
    finally:
        guard.close()  # an error inside a step would leave the patches in place
    assert guard.steps == STEPS
    rows = _rows(tmp_path)
    assert [s for s, k in rows if k == "train/loss_step"] == [1, 3]


# ---------------------------------------------------------------------- logged values


def _rows(tmp_path: Path) -> dict[tuple[int, str], float]:
    """``{(step, key): value}`` of every filled cell of metrics.csv (each written once)."""
    with open(next(tmp_path.rglob("metrics.csv"))) as handle:
        out: dict[tuple[int, str], float] = {}
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key not in ("step", "epoch") and value != "":
                    assert (int(row["step"]), key) not in out
                    out[int(row["step"]), key] = float(value)
    return out


@pytest.mark.parametrize("kind", ["pose", "deepmac"])
def test_logged_values_are_lightnings_and_the_hand_computed_ones(kind, tmp_path):
    """Two epochs of batches of different sizes, log_every_n_steps=2 (logging steps 1, 3, 5, 7,
    9; an epoch's last step is 4 or 9): every ``train/<term>_step`` and ``train/<term>_epoch``
    value is, at the same step, the one Lightning's self.log(on_step=True, on_epoch=True) wrote
    (``ref/``), and equals the loss's own terms of that step, and their batch-size-weighted epoch
    mean, computed here."""
    module = _module(kind, reference=True)
    _trainer(tmp_path, 2, [], epochs=2).fit(module, train_dataloaders=_loader(kind))
    rows = _rows(tmp_path)
    calls = [{k: float(v) for k, v in c.items()} for c in module.loss.calls]
    assert len(calls) == 2 * STEPS
    names = list(calls[0])
    assert {k for _, k in rows if k.startswith("train/")} == {
        f"train/{n}_{w}" for n in names for w in ("step", "epoch")
    }
    sizes = [_batch_size(kind, i) for i in range(STEPS)]
    for name in names:
        for when in ("step", "epoch"):
            ours = _values(rows, f"train/{name}_{when}")
            lightning = _values(rows, f"ref/{name}_{when}")
            assert ours == pytest.approx(lightning, rel=1e-6, abs=1e-7), (name, when)
        expected = {s: calls[s][name] for s in (1, 3, 5, 7, 9)}
        assert _values(rows, f"train/{name}_step") == pytest.approx(expected, rel=1e-6)
        means = []
        for e in range(2):
            values = [calls[e * STEPS + i][name] for i in range(STEPS)]
            means.append(sum(b * v for b, v in zip(sizes, values, strict=True)) / sum(sizes))
        epochs = _values(rows, f"train/{name}_epoch")
        assert list(epochs.values()) == pytest.approx(means, rel=1e-6, abs=1e-7), name
    if kind == "pose":
        assert all(c["loss"] == pytest.approx(0.5 * c["loss/l2"]) for c in calls)
    else:
        # Every class supervises: the count is the batch's instances, whatever the net did.
        counts = [sum(DEEPMAC_COUNTS[i]) for i in range(STEPS)]
        assert _values(rows, "train/num_supervised_step") == {1: 0, 3: 2, 5: 3, 7: 4, 9: 1}
        mean = sum(b * n for b, n in zip(sizes, counts, strict=True)) / sum(sizes)
        epochs = _values(rows, "train/num_supervised_epoch")
        assert list(epochs.values()) == pytest.approx([mean, mean], rel=1e-6)


def _values(rows: dict[tuple[int, str], float], key: str) -> dict[int, float]:
    """``{step: value}`` of ``key`` in :func:`_rows`' cells, in step order."""
    return {s: v for (s, k), v in sorted(rows.items()) if k == key}


# ---------------------------------------------------------------------- non-finite steps


class _Watch(pl.Callback):
    """Counts the training steps started; refuses any validation (a non-finite step's weights
    must be caught before it)."""

    def __init__(self) -> None:
        self.started = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.started += 1

    def on_validation_start(self, trainer, pl_module) -> None:
        raise AssertionError("validation ran on the weights of a non-finite step")


@pytest.mark.parametrize("kind", ["pose", "deepmac"])
@pytest.mark.parametrize(
    ("log_every", "sized", "steps_run"),
    [(2, True, 4), (50, True, STEPS), (50, False, STEPS)],
    ids=["at-a-logging-step", "at-the-last-batch", "at-the-last-batch-of-an-unsized-loader"],
)
def test_nonfinite_step_is_named_at_the_next_read(kind, log_every, sized, steps_run, tmp_path):
    """A NaN loss in global step 2 is reported with that step and its terms at the next read:
    step 3 with log_every_n_steps=2, else the epoch's last batch (a loader without a length
    included), before validation."""
    watch = _Watch()
    trainer = _trainer(tmp_path, log_every, [watch])
    train, val = _loader(kind, sized, poison=2), _loader(kind)
    message = r"stage 1: non-finite loss" if kind == "pose" else r"non-finite mask loss"
    with pytest.raises(FloatingPointError, match=message + r" at step 2: loss=nan, "):
        trainer.fit(_module(kind), train_dataloaders=train, val_dataloaders=val)
    assert watch.started == steps_run


class _TwoRanks:
    """Rank 0 of a 2-process run whose ``all_gather`` stacks this rank's row with ``peer``."""

    def __init__(self, peer: list[float]) -> None:
        self._trainer = self.trainer = SimpleNamespace(world_size=2)
        self.device = torch.device("cpu")
        self.peer = torch.tensor(peer, dtype=torch.float64)
        self.sent: list[list[float]] = []

    def all_gather(self, row: torch.Tensor) -> torch.Tensor:
        self.sent.append(row.tolist())
        return torch.stack([row, self.peer])


def test_every_rank_decides_from_every_ranks_finding():
    """Under DDP a read gathers each rank's ``[step, kind, *terms]``: a rank whose own steps were
    finite stops too, naming the rank and the terms of the first non-finite step."""
    names = ("loss", "loss/l2")
    log = StepLog()
    log.add_terms(3, names, torch.tensor([1.0, 2.0]), 2)
    ranks = _TwoRanks([-1.0, -1.0, -1.0, -1.0])  # the peer's steps were finite
    assert read_step_log(ranks, log, log=False) is None
    assert ranks.sent == [[-1.0, -1.0, -1.0, -1.0]]

    log.add_terms(4, names, torch.tensor([1.0, 2.0]), 2)
    log.add_terms(5, names, torch.tensor([math.inf, 2.0]), 2)  # this rank: step 5
    ranks = _TwoRanks([4.0, LOSS, math.nan, 3.0])  # the peer: step 4, first
    event, text = read_step_log(ranks, log, log=False)
    assert ranks.sent == [[5.0, LOSS, math.inf, 2.0]]
    assert (event.step, event.kind, text) == (4, LOSS, "rank 1: loss=nan, loss/l2=3")


@pytest.mark.parametrize("kind", ["pose", "deepmac"])
def test_module_stops_on_another_ranks_nonfinite_step(kind, no_host_sync):
    """The modules read through the gather: rank 0's finite step does not hide rank 1's."""
    module = _module(kind)
    terms = [math.nan] * (2 if kind == "pose" else 4)  # rank 1's step 0
    ranks = _TwoRanks([0.0, LOSS, *terms])
    module._trainer = SimpleNamespace(world_size=2, global_step=0)
    module.all_gather = ranks.all_gather
    with no_host_sync():
        module.training_step(_loader(kind).dataset[0], 0)
    check = module.check_finite if kind == "pose" else module._check_finite
    with pytest.raises(FloatingPointError, match=r"at step 0: rank 1: loss=nan"):
        check()
