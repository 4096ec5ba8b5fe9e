"""The training step keeps its numbers on the device; evaluation scores float32 logits."""

from __future__ import annotations

import csv
import math
import re
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_modules.parsing import NonFiniteLossError, NonFiniteWeightsError, ParsingLitModule
from lightning_modules.step_state import LOSS, WEIGHTS, NonFinite, StepLog, norm_sum
from losses import CrossEntropyLoss, InterClassLoss, ParsingLoss
from samplers import RegionalBalancedSampler

C = 5


class _TinyNet(torch.nn.Module):
    """A 3x3 convolution at half resolution, upsampled, plus an auxiliary 1x1 head and BatchNorm:
    every op of a real parsing net's step (encoder freezing included) at a few hundred weights."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.BatchNorm2d(8))
        self.head = torch.nn.Conv2d(8, C, 1)
        self.aux_head = torch.nn.Conv2d(8, C, 1)
        self.use_aux = True

    def freeze_encoder(self) -> None:
        self.encoder.requires_grad_(False)

    def score_outputs(self, scored: set[str]) -> list[str]:
        self.use_aux = "aux" in scored
        self.aux_head.requires_grad_(self.use_aux)
        return [] if self.use_aux else ["aux"]

    def forward(self, x):
        feats = self.encoder(x)
        size = x.shape[-2:]
        out = {"out": F.interpolate(self.head(feats), size=size, mode="bilinear")}
        if self.use_aux:
            out["aux"] = F.interpolate(self.aux_head(feats), size=size, mode="bilinear")
        return out


def _module(stage: int, **kwargs) -> ParsingLitModule:
    sampler = None
    if stage == 1:
        loss = ParsingLoss(CrossEntropyLoss(), aux_weight=0.4)
    else:
        loss = ParsingLoss(CrossEntropyLoss(), aux_weight=0.0, ilm=InterClassLoss(margin=1.0))
        sampler = RegionalBalancedSampler(C)
        sampler.set_statistics(torch.linspace(0.9, 0.1, C, dtype=torch.float64))
    return ParsingLitModule(
        net=_TinyNet(),
        loss=loss,
        optimizer=partial(torch.optim.SGD, lr=0.1),
        sampler=sampler,
        num_classes=C,
        freeze_encoder=stage == 2,
        **kwargs,
    )


def _batch(n: int = 2, size: int = 16, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.randint(0, C, (n, size, size), generator=g)
    mask[:, :2] = 255
    return {"image": torch.randn(n, 3, size, size, generator=g), "mask": mask}


@pytest.mark.parametrize("stage", [1, 2])
def test_training_step_makes_no_host_transfer(stage, no_host_sync):
    """Forward, loss (ARBS + ILM in stage 2), the loss records and the training confusion
    matrix of the ARBS epoch run without one tensor -> host conversion."""
    module = _module(stage, track_train_confusion=True)
    module._trained_parameters = [p for p in module.net.parameters() if p.requires_grad]
    with no_host_sync():
        for seed in range(2):
            loss = module.training_step(_batch(seed=seed), 0)
            loss.backward()
    assert int(module.train_confmat.compute().sum()) == 2 * 2 * 14 * 16  # labelled pixels
    # Nothing non-finite was recorded; the record is read outside the guard.
    module._read_step_state(log=False)


def test_nonfinite_step_is_named_when_read():
    """A NaN loss in the second of three steps is reported, with its terms, when the host reads
    the record after the third: the first bad step wins, finite later steps do not hide it."""
    module = _module(1)
    module._trained_parameters = list(module.net.parameters())
    module.training_step(_batch(seed=0), 0).backward()
    module._read_step_state(log=False)  # finite so far
    poisoned = _batch(seed=1)
    poisoned["image"][0, 0, 5, 5] = math.nan
    module.training_step(poisoned, 1)
    module.training_step(_batch(seed=2), 2)
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite loss at global step 0 .*loss=nan"
    ) as e:
        module._read_step_state(log=False)
    assert "The weights were finite at the read: check this batch's data" in str(e.value)


def test_nonfinite_gradient_stops_the_run_by_the_weights_it_makes():
    """A finite loss whose gradient is NaN: the SGD update makes the weights NaN, and the read
    right after stops with the weights' message, naming the parameter; a NaN loss and NaN
    weights in the same step are reported as the loss; NaN weights made between two reads show
    as the next step's loss."""
    module = _module(1)
    module._trained_parameters = list(module.net.parameters())
    opt = torch.optim.SGD(module._trained_parameters, lr=0.1)
    module.training_step(_batch(seed=0), 0).backward()
    module.net.head.weight.grad[0, 0] = math.nan
    opt.step()
    with pytest.raises(
        NonFiniteWeightsError,
        match=r"non-finite weights at global step 0 .* 1 of 8 parameters "
        r"\(e\.g\. net\.head\.weight\).*The run stopped after this step",
    ):
        module._read_step_state(log=False)

    poisoned = _batch(seed=1)
    poisoned["image"][0, 0, 5, 5] = math.nan
    module.training_step(poisoned, 1)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at global step 0 ") as err:
        module._read_step_state(log=False)
    assert not isinstance(err.value, NonFiniteWeightsError)
    assert "The weights are non-finite too" in str(err.value)

    module = _module(1)
    module._trained_parameters = list(module.net.parameters())
    opt = torch.optim.SGD(module._trained_parameters, lr=0.1)
    module.training_step(_batch(seed=0), 0).backward()
    module.net.head.weight.grad[0, 0] = math.inf
    opt.step()  # no read here: the next forward runs on the -inf weight
    module.training_step(_batch(seed=1), 1)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at global step 0 .*loss=nan"):
        module._read_step_state(log=False)


@pytest.mark.parametrize("update", ["sgd", "adam", "adamw", "clip_norm"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_an_update_with_a_nonfinite_gradient_makes_the_weights_nonfinite(update, bad):
    """What the weights check relies on: SGD (momentum, weight decay), Adam, AdamW and SGD after
    clipping by norm each turn one non-finite gradient entry into a non-finite weight."""
    w = torch.nn.Parameter(torch.ones(4))
    make = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4),
        "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
        "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3),
        "clip_norm": lambda p: torch.optim.SGD(p, lr=0.1),
    }
    opt = make[update]([w])
    w.grad = torch.tensor([0.5, bad, -0.5, 0.1])
    if update == "clip_norm":
        torch.nn.utils.clip_grad_norm_([w], max_norm=1.0)
    opt.step()
    assert not torch.isfinite(norm_sum([w.detach()]))


def test_step_log_against_hand_values(no_host_sync):
    log = StepLog()
    with no_host_sync():  # keeping steps costs no transfer
        log.add_terms(3, ("loss", "loss/ce"), torch.tensor([1.0, 2.0]), 4)
        log.add_weights_norm(3, torch.tensor(0.5))
        log.add_terms(4, ("loss", "loss/ce"), torch.tensor([3.0, 5.0]), 1)
    assert log.read() is None and log.last == {"loss": 3.0, "loss/ce": 5.0}
    log.add_terms(5, ("loss", "loss/soft"), torch.tensor([10.0, 7.0]), 5)  # a term from then on
    assert log.read() is None and not log.pending
    means = log.epoch_means()
    assert means["loss"] == pytest.approx((4 * 1 + 1 * 3 + 5 * 10) / 10)
    assert means["loss/ce"] == pytest.approx((4 * 2 + 1 * 5) / 5)
    assert means["loss/soft"] == pytest.approx(7.0)
    log.reset()
    assert log.epoch_means() == {}

    # The first bad step of a read wins; in one step a bad loss comes before the weights its
    # update made.
    log.add_terms(6, ("loss",), torch.tensor([1.0]), 1)
    log.add_weights_norm(6, torch.tensor(1.0))
    log.add_terms(7, ("loss",), torch.tensor([2.0]), 1)
    assert log.last_step == 7
    log.add_weights_norm(7, torch.tensor(math.inf))
    log.add_terms(8, ("loss",), torch.tensor([math.nan]), 1)
    assert log.read() == NonFinite(7, WEIGHTS, {"loss": 2.0})
    assert log.last_step is None and not log.pending
    log.add_terms(9, ("loss",), torch.tensor([math.nan]), 1)
    log.add_weights_norm(9, torch.tensor(math.nan))
    event = log.read()
    assert (event.step, event.kind) == (9, LOSS) and math.isnan(event.terms["loss"])


def test_norm_sum_is_the_sum_of_the_tensor_norms_and_catches_every_nonfinite():
    g = [torch.tensor([3.0, 4.0]), torch.ones(2, 2), torch.zeros(3)]
    assert float(norm_sum(g)) == pytest.approx(5.0 + 2.0)
    for bad in (math.nan, math.inf, -math.inf):
        poisoned = [t.clone() for t in g]
        poisoned[2][1] = bad
        assert not torch.isfinite(norm_sum(poisoned))


class _Batches(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.items = [_batch(1, seed=i) for i in range(5)]

    def __len__(self) -> int:
        return 5

    def __getitem__(self, i):
        return {k: v[0] for k, v in self.items[i].items()}


class _Losses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _bare_fit(
    module, log_every: int, callbacks: list, plugins: list | None = None, batch_size: int = 2,
    **trainer: Any,
) -> pl.Trainer:  # fmt: skip
    """One epoch over :class:`_Batches` (batches of 2: 2, 2, 1), no logger, checkpoints or
    progress bar unless ``trainer`` (more Trainer arguments) asks for them; returns the Trainer."""
    trainer = pl.Trainer(
        **{
            "accelerator": "cpu",
            "max_epochs": 1,
            "log_every_n_steps": log_every,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": callbacks,
            "plugins": plugins,
            **trainer,
        }
    )
    loader = torch.utils.data.DataLoader(_Batches(), batch_size=batch_size)
    trainer.fit(module, train_dataloaders=loader)
    return trainer


def _fit(module, tmp_path: Path, log_every: int, callbacks: list) -> None:
    """:func:`_bare_fit` with a CSV logger in ``tmp_path``; a progress bar only when
    ``callbacks`` holds one."""
    bar = any(isinstance(c, pl.callbacks.ProgressBar) for c in callbacks)
    logger = pl.loggers.CSVLogger(tmp_path, name="csv")
    _bare_fit(module, log_every, callbacks, logger=logger, enable_progress_bar=bar)


class _PoisonGradient(pl.Callback):
    """Sets one gradient entry of the head to NaN before the optimizer step of ``at_step``."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.at_step:
            pl_module.net.head.weight.grad[0, 0] = math.nan


def test_a_nan_gradient_in_a_fit_stops_at_the_read_after_it():
    """A NaN gradient in step 1 (its loss finite): read every step, the run stops at the read
    after step 1's update with the weights' message; read only at the epoch's end, it stops
    there, with step 2's loss, which the NaN weights made."""
    losses = _Losses()
    with pytest.raises(NonFiniteWeightsError, match=r"non-finite weights at global step 2 "):
        _bare_fit(_module(1), 1, [_PoisonGradient(1), losses])
    assert len(losses.losses) == 2 and all(math.isfinite(v) for v in losses.losses)
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite loss at global step 2 .*loss=nan"
    ) as e:
        _bare_fit(_module(1), 50, [_PoisonGradient(1)])
    # ... and says that the weights are non-finite too, with both possible causes
    assert re.search(
        r"The weights are non-finite too at this read .* or an update before", str(e.value)
    )


def test_schp_cycle_end_reads_the_steps_before_averaging_the_weights_in():
    """A NaN gradient in the last step of an epoch that ends an SCHP cycle: the run stops with
    the weights' message before the average takes the NaN weights in (Lightning runs the
    callback's batch-end hook before the module's read); a finite epoch averages at its end."""
    from lightning_modules.schp import SCHPCycle, SCHPLitModule

    def schp_module(updates: list[int]) -> SCHPLitModule:
        module = SCHPLitModule(
            net=_TinyNet(),
            loss=ParsingLoss(CrossEntropyLoss(), aux_weight=0.4),
            optimizer=partial(torch.optim.SGD, lr=0.1),
            num_classes=C,
        )
        module.schp_update = lambda images, epoch: updates.append(epoch)
        return module

    updates: list[int] = []
    with pytest.raises(NonFiniteWeightsError, match=r"non-finite weights at global step 3 "):
        _bare_fit(schp_module(updates), 50, [SCHPCycle(1, 1), _PoisonGradient(2)])
    assert updates == []
    _bare_fit(schp_module(updates), 50, [SCHPCycle(1, 1)])
    assert updates == [1]


def test_fp16_grad_scaler_steps_skipped_for_inf_gradients_do_not_stop_the_run():
    """precision=16-mixed: a GradScaler whose scale makes step 0's gradients inf skips that update
    (its normal start, forced here with a huge initial scale), lowers the scale (2^126 -> 2^6),
    and the run trains on: steps 1 and 2 update the weights, which stay finite. A check of every
    step's gradients stopped the run at step 0."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    module = _module(1)
    before = [p.detach().clone() for p in module.net.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**126, backoff_factor=2.0**-120)
    seen: list[float] = []

    class Scale(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            seen.append(scaler.get_scale())

    _bare_fit(module, 1, [Scale()], plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert seen == [2.0**126, 2.0**6, 2.0**6] and scaler.get_scale() == 2.0**6
    after = list(module.net.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert not all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_fp16_grad_scaler_skipping_every_update_stops_the_run():
    """A NaN in every step's gradients (before the scaler unscales them): the GradScaler skips
    every update, the weights stay finite, and the scale falls below fp16's range at the first
    read (2^16 -> 2^-44), which stops the run."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    class NanBackward(pl.Callback):
        def on_after_backward(self, trainer, pl_module) -> None:
            pl_module.net.head.weight.grad[0, 0] = math.nan

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, backoff_factor=2.0**-60)
    module = _module(1)
    with pytest.raises(NonFiniteLossError, match=r"fp16 loss scale 5\.68e-14 at global step 1 "):
        _bare_fit(module, 1, [NanBackward()], [MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert all(torch.isfinite(p).all() for p in module.net.parameters())


def test_weights_are_read_once_per_update_under_gradient_accumulation(monkeypatch):
    """accumulate_grad_batches=2 over 5 batches of 1, a read at every batch: updates after
    batches 1, 3 and 4 (the epoch's last); the weights' norm is taken once per update count
    (batches 0: the initial weights, 1, 3, 4), not at batch 2, whose read follows no update."""
    import lightning_modules.parsing as parsing

    calls: list[int] = []
    real = parsing.norm_sum
    monkeypatch.setattr(parsing, "norm_sum", lambda t: calls.append(len(t)) or real(t))
    trainer = _bare_fit(_module(1), 1, [], batch_size=1, accumulate_grad_batches=2)
    assert trainer.global_step == 3 and len(calls) == 4


def test_logged_step_and_epoch_values_match_lightnings_layout(tmp_path):
    """Batches of 2, 2, 1 and log_every_n_steps=2: train/loss_step is written at step 1 with that
    step's loss, train/loss_epoch is the batch-size-weighted mean, as self.log(on_step=True,
    on_epoch=True) wrote them."""
    module = _module(1)
    losses = _Losses()
    _fit(module, tmp_path, 2, [losses])
    with open(next(tmp_path.rglob("metrics.csv"))) as handle:
        rows = list(csv.DictReader(handle))
    steps = [(int(r["step"]), float(r["train/loss_step"])) for r in rows if r["train/loss_step"]]
    assert steps == [(1, pytest.approx(losses.losses[1], rel=1e-6))]
    epoch = [float(r["train/loss_epoch"]) for r in rows if r["train/loss_epoch"]]
    expected = (2 * losses.losses[0] + 2 * losses.losses[1] + losses.losses[2]) / 5
    assert epoch == [pytest.approx(expected, rel=1e-6)]
    assert "train/loss/ce_step" in rows[0] and "train/loss/main_step" not in rows[0]


def test_progress_bar_shows_each_read_loss_without_a_host_sync(tmp_path, no_host_sync):
    """log_every_n_steps=1: the bar shows each step's loss from the next step on, and from a
    step's start to the bar's update nothing is converted on the host (a loss given to
    self.log(prog_bar=True) would be converted at every later step by Lightning's metrics)."""
    from lightning_modules.callbacks import StepMetricsProgressBar

    module, losses, bar = _module(1), _Losses(), StepMetricsProgressBar()
    shown: list[float | None] = []

    class Guard(pl.Callback):
        def __init__(self, enter: bool) -> None:
            self.enter = enter

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if self.enter:
                shown.append(bar.get_metrics(trainer, pl_module).get("train/loss_step"))
                self.guard = no_host_sync()
                self.guard.__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if not self.enter:
                first.guard.__exit__(None, None, None)

    first = Guard(True)
    _fit(module, tmp_path, 1, [first, bar, Guard(False), losses])
    assert shown[0] is None
    assert shown[1:] == [pytest.approx(v, rel=1e-6) for v in losses.losses[:-1]]
    assert all(isinstance(v, float) for v in shown[1:])


def test_progress_bar_redraws_at_most_every_min_interval_and_at_the_last_batch(monkeypatch):
    """Batches end at 0, 0.05, 0.12, 0.15 and 0.16 s of 5: redrawn after batches 0 and 2 (0.1 s
    apart or more) and after the last one, also when the loader has no length."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import RichProgressBar

    import lightning_modules.callbacks as callbacks

    drawn: list[int] = []
    monkeypatch.setattr(
        RichProgressBar, "on_train_batch_end", lambda self, t, m, o, b, i: drawn.append(i)
    )
    clock = iter([0.0, 0.05, 0.12, 0.15, 0.16])
    monkeypatch.setattr(callbacks.time, "monotonic", lambda: next(clock))
    bar = callbacks.StepMetricsProgressBar(min_interval=0.1)
    bar.train_progress_bar_id = 0  # the bar of a started epoch
    progress = SimpleNamespace(is_last_batch=False)
    trainer = SimpleNamespace(
        num_training_batches=5,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)),
    )
    for i in range(5):
        bar.on_train_batch_end(trainer, None, None, None, i)
    assert drawn == [0, 2, 4]
    # A loader without a length: the last batch is the one after which the fetcher is done.
    drawn.clear()
    clock = iter([1.0, 1.05, 1.12, 1.15, 1.16])
    trainer.num_training_batches = float("inf")
    for i in range(5):
        progress.is_last_batch = i == 4
        bar.on_train_batch_end(trainer, None, None, None, i)
    assert drawn == [0, 2, 4]


def test_validation_scores_float32_logits_under_bf16_autocast():
    """Under bf16 autocast the net's logits are bf16; they are resized and arg-maxed in float32,
    as predict does. The bf16 resize would decide other pixels (checked, so the test can fail)."""
    torch.manual_seed(0)
    module = ParsingLitModule(
        net=torch.nn.Conv2d(3, 20, 1),  # wrapped below: logits at 1/8 of the label size
        loss=ParsingLoss(CrossEntropyLoss()),
        optimizer=partial(torch.optim.SGD, lr=0.1),
        num_classes=20,
    )
    conv = module.net
    module._net_forward = lambda x: {"out": conv(F.avg_pool2d(x, 8))}
    batch = {"image": torch.randn(2, 3, 64, 64), "mask": torch.randint(0, 20, (2, 64, 64))}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = module.predict_logits(batch["image"])
        module._eval_step(batch, module.val_confmat, "val")
    assert low.dtype == torch.bfloat16
    got = module.val_confmat.compute()

    def confusion(logits):
        preds = F.interpolate(logits, size=(64, 64), mode="bilinear").argmax(1)
        index = batch["mask"] * 20 + preds
        return torch.bincount(index.flatten(), minlength=400).reshape(20, 20)

    assert torch.equal(got, confusion(low.float()))
    assert not torch.equal(got, confusion(low))  # bf16 resizing changes the decisions


@pytest.mark.parametrize("model", ["pspnet_lite", "danet_lite", "deeplabv3plus_lite", "ce2p_lite"])
def test_nets_resize_their_eval_logits_in_float32_under_bf16_autocast(model):
    """In eval mode a net's last resize (its classifier's 1/8 or 1/4 logits to the input) runs
    in float32 under bf16 autocast: the output equals the classifier's bf16 logits resized in
    float32, and differs from a bf16 resize (checked, so the test can fail). Training keeps the
    logits' dtype (the loss upcasts)."""
    import hydra
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "model" / f"{model}.yaml")
    cfg.num_classes = 20
    torch.manual_seed(0)
    net = hydra.utils.instantiate(cfg).eval()
    low = {}
    net.classifier.register_forward_hook(lambda m, i, o: low.__setitem__("out", o))
    x = torch.randn(2, 3, 64, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = net(x)["out"]
    assert low["out"].dtype == torch.bfloat16 and low["out"].shape[-2:] != (64, 48)
    assert out.dtype == torch.float32
    corners = bool(net.align_corners) and model != "ce2p_lite"
    want = F.interpolate(low["out"].float(), size=(64, 48), mode="bilinear", align_corners=corners)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    in_bf16 = F.interpolate(low["out"], size=(64, 48), mode="bilinear", align_corners=corners)
    assert not torch.equal(out, in_bf16.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net.train()(x)["out"].dtype == torch.bfloat16


@pytest.mark.parametrize("mode", ["flip", "slide"])
def test_flip_and_slide_resize_bf16_logits_in_float32(mode):
    """The inference protocols resize a net's bf16 logits (a net that returns them below the
    input size) in float32: the same scores as from the logits cast to float32 first."""
    from lightning_modules.inference import InferenceProtocol

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 6, 1)

    def low_res(x):  # (B, 3, H, W) -> (B, 6, H/4, W/4) bf16 logits
        return conv(F.avg_pool2d(x, 4)).bfloat16()

    if mode == "flip":
        protocol = InferenceProtocol(flip=True)
    else:
        protocol = InferenceProtocol(
            mode="slide", crop_size=(32, 32), stride=(16, 16), num_classes=6
        )
    image = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        got = protocol(low_res, image)
        want = protocol(lambda x: low_res(x).float(), image)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_channels_last_converts_the_weights():
    module = _module(1, channels_last=True)
    convs = [p for p in module.net.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    out = module(torch.randn(2, 3, 16, 16))["out"]
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_lovasz_makes_no_host_transfer(no_host_sync):
    from losses.lovasz import lovasz_softmax

    logits = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 3, (2, 6, 6))  # class 3 absent: left out of "present"
    target[0, 0] = 255
    with no_host_sync():
        loss = lovasz_softmax(logits, target)
        loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss).item()


def test_sync_batchnorm_auto_follows_the_per_process_batch():
    from cfg_utils import compose_cfg

    from experiments.launch import batch_norm_sync

    assert batch_norm_sync({"sync_batchnorm": "auto"}, 2) == {"sync_batchnorm": True}
    assert batch_norm_sync({"sync_batchnorm": "auto"}, 8) == {"sync_batchnorm": False}
    assert batch_norm_sync({"sync_batchnorm": True}, 16) == {}
    cfg = compose_cfg(["trainer=ddp"], Path("/nonexistent"))
    assert cfg.trainer.sync_batchnorm == "auto"
    # The mmseg Cityscapes recipe (2 images per GPU) asks for it explicitly.
    cfg = compose_cfg(["trainer=ddp", "experiment=pspnet_cityscapes"], Path("/nonexistent"))
    assert cfg.trainer.sync_batchnorm is True


@pytest.mark.parametrize("module_name", ["PositionAttentionModule", "ChannelAttentionModule"])
def test_danet_attention_keeps_bf16_and_channels_last(module_name):
    """Under bf16 autocast with channels-last input the attention's output stays bf16 and
    channels-last (the float32 gamma promoted it, the reshape made it NCHW), and equals the NCHW
    computation."""
    from lightning_modules.nets import danet

    torch.manual_seed(0)
    module = getattr(danet, module_name)(*([16] if module_name.startswith("Position") else []))
    with torch.no_grad():
        module.gamma.fill_(0.5)
    x = torch.randn(2, 16, 5, 7)
    features = x.bfloat16()  # what the convolution before it returns under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nhwc = module(features.contiguous(memory_format=torch.channels_last))
        nchw = module(features)
    assert nhwc.dtype == torch.bfloat16 and nchw.dtype == torch.bfloat16
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and nchw.is_contiguous()
    reference = module(x)  # float32
    assert torch.allclose(nhwc.float(), reference, atol=0.1, rtol=0.05)
    assert torch.allclose(nchw.float(), reference, atol=0.1, rtol=0.05)


def test_danet_channel_attention_is_accurate_under_bf16_at_a_realistic_size():
    """The channel affinity sums N = h * w products: at 1/8 of a 256x512 crop (N = 2048, 256
    channels) its entries are in the hundreds to thousands, where bf16 steps by 2-16 while the
    softmax weighs differences of a few units. Computed in float32 inside, the module's output
    under bf16 autocast is within bf16's own rounding of the float32 output (a bf16 affinity was
    off by about 30%, checked below so the test can fail)."""
    from lightning_modules.nets.danet import ChannelAttentionModule

    torch.manual_seed(0)
    cam = ChannelAttentionModule()
    with torch.no_grad():
        cam.gamma.fill_(1.0)
    x = torch.relu(torch.randn(1, 256, 32, 64))  # post-ReLU features, as DANet's cam_in gives
    with torch.no_grad():
        reference = cam(x) - x  # the attention's part in float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = cam(x.bfloat16()).float() - x
        flat = x.bfloat16().flatten(2)
        energy = torch.bmm(flat, flat.transpose(1, 2))  # (1, C, C) in bf16, the failure mode
        attention = (energy.amax(-1, keepdim=True) - energy).float().softmax(-1)
        in_bf16 = torch.bmm(attention, x.flatten(2)).reshape_as(x)

    def error(y):
        return float((y - reference).norm() / reference.norm())

    assert error(got) < 0.02  # 0.9%: bf16 input and context product
    assert error(in_bf16) > 0.1


def test_compiled_net_compiles_once_across_train_eval_switches(monkeypatch):
    """module.compile=true: training steps, validation at two sizes and training again capture
    the training graph once and run evaluation eagerly (dynamo's eager backend: no codegen)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda net: real(net, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    module = _module(1, compile=True)
    for round_ in range(2):
        module.train()
        module.training_step(_batch(seed=round_), 0).backward()
        module.eval()
        with torch.no_grad():
            for size in (16, 24):
                module._eval_step(_batch(1, size), module.val_confmat, "val")
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()
