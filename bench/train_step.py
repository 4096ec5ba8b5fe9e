"""Training throughput: rimlab's own step (Lightning, real loss/sampler/optimizer) vs a hand loop.

    python bench/train_step.py                      # GPU: PSPNet-R50, 400x400, batch 16, bf16
    python bench/train_step.py --stage 2            # RIM stage 2: frozen encoder, ARBS + ILM
    python bench/train_step.py --device cpu --size 64 --batch 2 --steps 2 --warmup 1 \
        --override model=pspnet_lite --precision 32 --data-batches 2     # CPU smoke test

Both variants train the same network (same initial weights) on the same pre-made batches already on
the device: ``rimlab`` runs ``ParsingLitModule`` through a Lightning ``Trainer`` exactly as
``run.py`` builds it (loss, sampler, optimizer, scheduler, metrics, precision plugin), ``hand`` is
a plain PyTorch loop (forward, cross-entropy + 0.4 aux, backward, SGD step) with the same
precision and memory format. Reported: ms/step, images/s, FLOP per image (``torch.utils.
flop_counter`` on one forward + backward), achieved TFLOP/s and model FLOP utilisation against
``--peak-tflops``, peak GPU memory, and the data pipeline's images/s on its own (decode +
augmentation + collate from the configured dataset, no model). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RIMLAB_ROOT", str(ROOT))

import lightning.pytorch as pl  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from experiments.build import build_datamodule, build_module  # noqa: E402

# The clock steps are timed with: wall time, or this process's CPU time (``--clock cpu``: on a
# machine shared with other jobs it leaves out the time spent waiting for a core).
CLOCK = [time.perf_counter]

# H100 SXM dense bf16 matmul rate measured with torch.matmul (see docs/performance.md).
H100_BF16_TFLOPS = 798.0


def compose_config(overrides: list[str], size: int, batch: int, data_dir: Path) -> DictConfig:
    """The run config of ``overrides`` with this benchmark's crop, batch and paths."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "run",
            overrides=[
                *overrides,
                f"data.crop_size=[{size},{size}]",
                f"data.batch_size={batch}",
                f"paths.data_dir={data_dir}",
                f"paths.log_dir={data_dir / 'logs'}",
                "paths.output_dir=.",
            ],
        )
    return cfg


def make_batches(n: int, batch: int, size: int, classes: int, device: torch.device) -> list[dict]:
    """``n`` batches of random images and long-tailed labels (class c with weight 1/(c+1))."""
    g = torch.Generator().manual_seed(0)
    weights = 1.0 / torch.arange(1, classes + 1, dtype=torch.float)
    out = []
    for i in range(n):
        labels = torch.multinomial(weights, batch * size * size, replacement=True, generator=g)
        out.append(
            {
                "image": torch.randn(batch, 3, size, size, generator=g).to(device),
                "mask": labels.view(batch, size, size).to(device),
                "name": [f"b{i}_{k}" for k in range(batch)],
            }
        )
    return out


class _Batches:
    """An iterable of ready batches (a plain list would be read as a list of dataloaders)."""

    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class _StepTimer(pl.Callback):
    """Time of the steps after ``warmup`` up to step ``total`` (CUDA synchronised only at both
    ends, as the hand loop is: a sync per step would hide the host's run-ahead).

    With ``hand`` (``{name: step}``, hand-loop steps, CPU only) one step of each runs after each
    timed rimlab step, inside the same fit, and is timed on its own (their order alternates from
    step to step): all variants then see the same load from step to step, which rounds of 40
    steps on a shared machine do not. Timing runs from the start of step ``warmup`` to the start
    of step ``total``, so that every Lightning hook of the timed steps counts. ``profiler`` (a
    ``cProfile.Profile``) runs over the same steps.
    """

    def __init__(self, warmup: int, total: int, hand=None, profiler=None) -> None:
        self.warmup, self.total, self.hand, self.profiler = warmup, total, hand or {}, profiler
        self.start, self.end, self.first_loss = 0.0, 0.0, None
        self.hand_seconds = dict.fromkeys(self.hand, 0.0)

    def _sync(self, module: pl.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self._sync(pl_module)
            self.start = CLOCK[0]()
            if self.profiler is not None:
                self.profiler.enable()
        elif batch_idx == self.total:
            if self.profiler is not None:
                self.profiler.disable()
            self._sync(pl_module)
            self.end = CLOCK[0]()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.first_loss = float(outputs["loss"])
        if not self.hand or not self.warmup <= batch_idx < self.total:
            return
        if batch_idx == self.warmup:
            if self.profiler is not None:
                self.profiler.disable()
            for step in self.hand.values():
                step()  # builds the hand loop and runs its untimed first step
            if self.profiler is not None:
                self.profiler.enable()
        names = list(self.hand)
        for name in names if batch_idx % 2 == 0 else names[::-1]:
            start = CLOCK[0]()
            self.hand[name]()
            self.hand_seconds[name] += CLOCK[0]() - start


def bench_trainer(
    cfg: DictConfig | None,
    device: torch.device,
    precision: str,
    steps: int,
    callback: pl.Callback,
    first: bool = False,
) -> pl.Trainer:
    """A one-epoch Trainer of ``steps`` training batches without validation, with ``callback``
    added (first with ``first``, else last). With ``cfg`` the one ``run.py`` builds
    (``experiments.build.build_trainer``: the configured callbacks, progress bar, CSV logger,
    checkpoint callbacks, epoch seeding); without it a bare Trainer (no logger, checkpoints,
    progress bar or model summary)."""
    gpu = device.type == "cuda"
    if cfg is None:
        return pl.Trainer(
            accelerator="gpu" if gpu else "cpu",
            devices=1,
            precision=precision,
            max_epochs=1,
            limit_train_batches=steps,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[callback],
            benchmark=gpu,
        )
    from experiments.build import build_trainer

    with open_dict(cfg):
        cfg.trainer.accelerator = "gpu" if gpu else "cpu"
        cfg.trainer.devices = 1
        cfg.trainer.precision = precision
        cfg.trainer.limit_train_batches = steps
        cfg.trainer.limit_val_batches = 0
        cfg.trainer.num_sanity_val_steps = 0
        cfg.trainer.benchmark = gpu
        cfg.trainer.strategy = "auto"
    trainer = build_trainer(cfg, Path(cfg.paths.output_dir), max_epochs=1)
    trainer.callbacks.insert(0 if first else len(trainer.callbacks), callback)
    return trainer


def time_rimlab(
    module, batches, args, device, cfg=None, hand=None, profiler=None
) -> tuple[float, dict[str, float], float]:
    """Seconds per step of the LightningModule under a Trainer, of each interleaved ``hand``
    step (``{name: seconds}``), and the first step's loss.

    With ``cfg`` the Trainer is the one ``run.py`` builds (``experiments.build.build_trainer``:
    the configured callbacks, progress bar, CSV logger, checkpoint callbacks, epoch seeding), so
    metrics, logging and the progress bar cost what they cost a user; without it a bare Trainer.
    """
    steps = args.warmup + args.steps
    timer = _StepTimer(args.warmup, steps, hand, profiler)
    steps += 1  # the timing ends at the start of one more step
    trainer = bench_trainer(cfg, device, args.precision, steps, timer)
    loader = _Batches([batches[i % len(batches)] for i in range(steps)])
    trainer.fit(module, train_dataloaders=loader)
    hand_s = {name: t / args.steps for name, t in timer.hand_seconds.items()}
    return (timer.end - timer.start) / args.steps - sum(hand_s.values()), hand_s, timer.first_loss


def _next_batch(batches: list[dict], state: dict, channels_last: bool) -> tuple[dict, torch.Tensor]:
    """The step's next batch (cycling) and its image, in channels-last layout when asked.

    Advances ``state["i"]``, the step counter both step functions read.
    """
    batch = batches[state["i"] % len(batches)]
    state["i"] += 1
    image = batch["image"]
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    return batch, image


def hand_step_fn(net, batches, args, device, aux_weight: float, sampler=None, ilm=None, mark=None):
    """A plain training step over ``net``: the yardstick rimlab's step is compared with.

    Stage 2 passes the regional ``sampler`` (its pixels outside the mask become 255 for the main
    term) and the inter-class loss ``ilm`` (added with weight 1), as RIM's stage 2 computes them.
    ``mark(name)`` (``bench/step_phases.py``) is called at the start of each phase and at the end.
    """
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    bf16 = args.precision.startswith("bf16")
    state = {"i": 0}

    def step() -> float:
        if mark is not None:
            mark("forward")
        batch, image = _next_batch(batches, state, args.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = net(image)
            if mark is not None:
                mark("loss")
            target = batch["mask"]
            if sampler is not None:
                target = target.masked_fill(~sampler(target), 255)
            loss = F.cross_entropy(out["out"], target, ignore_index=255)
            if ilm is not None:
                loss = loss + ilm(out["out"], batch["mask"])
            if "aux" in out and aux_weight > 0:
                loss = loss + aux_weight * F.cross_entropy(
                    out["aux"], batch["mask"], ignore_index=255
                )
        if mark is not None:
            mark("zero_grad")
        opt.zero_grad(set_to_none=True)
        if mark is not None:
            mark("backward")
        loss.backward()
        if mark is not None:
            mark("optimizer")
        opt.step()
        if mark is not None:
            mark("end")
        return float(loss.detach()) if state["i"] == 1 else 0.0

    return step


def stage_hand_step(args, cfg, module, net, batches, device, aux_weight: float, mark=None):
    """:func:`hand_step_fn` for ``args.stage``: stage 2 adds a copy of the module's regional
    sampler and the inter-class loss with the configured margin."""
    sampler = ilm = None
    if args.stage == 2:
        from losses import InterClassLoss

        sampler = copy.deepcopy(module.sampler).to(device)
        ilm = InterClassLoss(margin=float(cfg.loss.ilm.margin)).to(device)
    return hand_step_fn(net, batches, args, device, aux_weight, sampler, ilm, mark)


def same_maths_step_fn(module, net, batches, args, device):
    """rimlab's step without Lightning: what ``hand - rimlab`` leaves out, so that
    ``rimlab - same_maths`` is what Lightning and the module's glue cost.

    ``net`` (a copy of the module's) trains with the module's loss, a copy of its sampler (own
    generator), its optimizer and per-step scheduler, and keeps the same loss terms on the device
    (``lightning_modules.step_state.StepLog``), read with the weights' norm as often as
    ``ParsingLitModule`` reads them, under the same precision and memory format.
    """
    from lightning_modules.step_state import StepLog, norm_sum, stack_terms

    loss_fn = copy.deepcopy(module.loss).to(device)
    sampler = copy.deepcopy(module.sampler).to(device) if module.sampler is not None else None
    generator = torch.Generator(device=device).manual_seed(1)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = module.optimizer_factory(params=params)
    scheduler = None
    if module.scheduler_factory is not None:
        scheduler = module.scheduler_factory(optimizer=opt, steps_per_epoch=args.steps + 2)
    bf16 = args.precision.startswith("bf16")
    step_log = StepLog()
    read_every = max(1, int(module.trainer.log_every_n_steps)) if module._trainer else 10
    state = {"i": 0}

    def step() -> float:
        batch, image = _next_batch(batches, state, args.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            outputs = net(image)
            target = batch["mask"]
            keep = sampler(target, generator=generator) if sampler is not None else None
            losses = loss_fn(outputs, target, sample_mask=keep)
        names = tuple(k for k in losses if k != "loss/main")
        terms = stack_terms({k: losses[k] for k in names})
        step_log.add_terms(state["i"], names, terms, image.shape[0])
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        if state["i"] % read_every == 0:
            if module.nonfinite != "off":  # the module's weights check
                step_log.add_weights_norm(state["i"], norm_sum([p.detach() for p in params]))
            step_log.read()  # the module's read (one transfer), without its logging
        return float(losses["loss"].detach()) if state["i"] == 1 else 0.0

    return step


def time_hand(step, args, device) -> tuple[float, float]:
    first = step()
    for _ in range(args.warmup - 1):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = CLOCK[0]()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (CLOCK[0]() - start) / args.steps, first


def flops_per_image(net, batch, args, device) -> float:
    """FLOP of one forward + backward per image (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    image = batch["image"]
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision != "32"):
            out = net(image)["out"]
            loss = F.cross_entropy(out, batch["mask"], ignore_index=255)
        loss.backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops() / image.shape[0]


def data_images_per_s(cfg: DictConfig, batches: int) -> float:
    """Images/s of the configured training loader alone (decode, augment, collate, workers)."""
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    n, start = 0, time.perf_counter()
    for _ in range(batches):
        try:
            n += len(next(it)["name"])
        except StopIteration:
            it = iter(loader)
    return n / (time.perf_counter() - start)


def build_bench(
    args: argparse.Namespace, device: torch.device
) -> tuple[DictConfig, pl.LightningModule, torch.nn.Module, list[dict], float]:
    """The benchmark's run config, ``ParsingLitModule``, a copy of its net for the hand loop (same
    initial weights; stage 2: encoder frozen), four ready batches on ``device`` and the hand
    loop's aux-loss weight. Stage 2 gets a long-tailed early confusion matrix for ARBS.
    """
    gpu = device.type == "cuda"
    overrides = ["experiment=pspnet_mhp", "data=synthetic_mhp", "model.pretrained=false"]
    overrides += ["optimizer=sgd", f"optimizer.lr={args.lr}", "data.num_workers=" + str(
        min(16, os.cpu_count() or 1) if gpu else 0)]  # fmt: skip
    if args.stage == 2:
        overrides += ["sampler=arbs", "loss=ce_ilm", "schedule=rim"]
    cfg = compose_config([*overrides, *args.override], args.size, args.batch, args.data_dir)
    with open_dict(cfg):
        cfg.module.channels_last = bool(args.channels_last)
    torch.manual_seed(0)
    stage_overrides = None
    if args.stage == 2:
        from experiments.rim import stage2_overrides

        stage_overrides = stage2_overrides(cfg)
    module = build_module(cfg, stage_overrides)
    if args.stage == 2:
        classes = int(cfg.data.num_classes)
        # A long-tailed early confusion matrix, as stage 1 would have recorded: class i is
        # recalled at a rate falling from 0.9 to 0.05, its misses predicted as background.
        recall = torch.linspace(0.9, 0.05, classes, dtype=torch.float64)
        confusion = torch.zeros(classes, classes, dtype=torch.int64)
        confusion[:, 0] = (1000 * (1 - recall)).long()
        confusion += torch.diag((1000 * recall).long())
        module.early_confusion.copy_(confusion)
        module.early_cpa_epoch.fill_(3)
    net_copy = copy.deepcopy(module.net).to(device)
    if args.channels_last:
        net_copy = net_copy.to(memory_format=torch.channels_last)
    net_copy.train()
    if args.stage == 2:
        net_copy.freeze_encoder()
    batches = make_batches(4, args.batch, args.size, int(cfg.data.num_classes), device)

    aux_weight = 0.0 if args.stage == 2 else float(cfg.loss.get("aux_weight", 0.0))
    return cfg, module, net_copy, batches, aux_weight


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--override", action="append", default=[], help="Hydra override")
    parser.add_argument("--stage", type=int, default=1, choices=(1, 2))
    parser.add_argument("--size", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--precision", default=None, help="bf16-mixed (GPU default) or 32")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS)
    parser.add_argument("--data-batches", type=int, default=20, help="0 skips the data bench")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "train_step.json")
    parser.add_argument(
        "--as-run",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="rimlab's Trainer as run.py builds it: callbacks, progress bar, CSV logger (default)",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="alternating rimlab/hand rounds; medians reported"
    )
    parser.add_argument(
        "--same-maths",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time a hand loop doing rimlab's maths (loss, sampler, checks, scheduler)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument(
        "--interleave",
        choices=("rounds", "steps"),
        default="rounds",
        help="alternate the variants by rounds, or step by step inside one fit (CPU only)",
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or the process's CPU time (CPU runs on a shared machine, --threads 1)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="cProfile the timed steps of the last round (both variants) into this .prof file",
    )
    args = parser.parse_args(argv)
    CLOCK[0] = time.perf_counter if args.clock == "wall" else time.process_time
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.precision = args.precision or ("bf16-mixed" if gpu else "32")
    args.channels_last = gpu if args.channels_last is None else args.channels_last
    if args.warmup < 1:
        parser.error("--warmup must be >= 1")
    if args.interleave == "steps" and gpu:
        parser.error("--interleave steps times both variants on the host: CPU runs only")

    cfg, module, net_copy, batches, aux_weight = build_bench(args, device)

    def make_hand_step():
        return stage_hand_step(args, cfg, module, net_copy, batches, device, aux_weight)

    def make_same_maths_step():
        return same_maths_step_fn(module, same_net, batches, args, device)

    # The hand variants; built inside the first fit (or after it), once ARBS has its statistics.
    makers = {"hand": make_hand_step}
    if args.same_maths:
        same_net = copy.deepcopy(net_copy)
        makers["same_maths"] = make_same_maths_step
    hand_steps: dict[str, Any] = {}

    def hand_step(name: str):
        def run() -> None:
            if name not in hand_steps:
                hand_steps[name] = makers[name]()
                first_loss[name] = hand_steps[name]()  # its first step, untimed
                return
            hand_steps[name]()

        return run

    run_cfg = None
    if args.as_run:
        run_cfg = cfg.copy()
        with open_dict(run_cfg):
            run_cfg.paths.output_dir = str(args.data_dir / "train_step_run")
    # Interleaved rounds: on a loaded machine both variants see the same load.
    rimlab_times, rimlab_mem = [], None
    hand_times: dict[str, list[float]] = {name: [] for name in makers}
    first_loss: dict[str, float] = {}
    for round_ in range(args.repeats):
        inside = None
        if args.interleave == "steps":
            inside = {name: hand_step(name) for name in makers}
        profiler = None
        if args.profile is not None and round_ == args.repeats - 1:
            import cProfile

            profiler = cProfile.Profile(CLOCK[0])
        seconds, inside_s, loss = time_rimlab(
            module, batches, args, device, run_cfg, inside, profiler
        )
        if profiler is not None:
            args.profile.parent.mkdir(parents=True, exist_ok=True)
            profiler.dump_stats(str(args.profile))
        rimlab_times.append(seconds)
        if gpu and round_ == 0:
            rimlab_mem = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        if round_ == 0:
            first_loss["rimlab"] = loss
        for name in makers:
            if args.interleave == "steps":
                hand_times[name].append(inside_s[name])
                continue
            if name not in hand_steps:
                hand_steps[name] = makers[name]()  # after the first fit (ARBS statistics)
            seconds, loss = time_hand(hand_steps[name], args, device)
            hand_times[name].append(seconds)
            first_loss.setdefault(name, loss)
    rimlab_s = statistics.median(rimlab_times)
    hand_s = statistics.median(hand_times["hand"])
    flops = flops_per_image(net_copy, batches[0], args, device)
    data_ips = data_images_per_s(cfg, args.data_batches) if args.data_batches > 0 else None

    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if gpu else "cpu",
        "torch": torch.__version__,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "ms_per_step": {"rimlab": 1000 * rimlab_s, "hand": 1000 * hand_s},
        "images_per_s": {"rimlab": args.batch / rimlab_s, "hand": args.batch / hand_s},
        "rimlab_vs_hand_percent": 100.0 * (rimlab_s - hand_s) / hand_s,
        "rimlab_minus_hand_ms": 1000 * (rimlab_s - hand_s),
        # per round (the variants of one round ran side by side), then the median
        "rimlab_minus_hand_rounds_ms": [
            1000 * (r - h) for r, h in zip(rimlab_times, hand_times["hand"], strict=True)
        ],
        "rounds_ms": {
            "rimlab": [1000 * t for t in rimlab_times],
            **{name: [1000 * t for t in times] for name, times in hand_times.items()},
        },
        "first_step_loss": {
            "rimlab": first_loss.get("rimlab"),
            **{name: first_loss.get(name) for name in makers},
        },  # fmt: skip
        "gflop_per_image": flops / 1e9,
        "tflops_achieved": {
            k: flops * args.batch / s / 1e12 for k, s in (("rimlab", rimlab_s), ("hand", hand_s))
        },
        "mfu_percent": {
            k: 100 * flops * args.batch / s / 1e12 / args.peak_tflops
            for k, s in (("rimlab", rimlab_s), ("hand", hand_s))
        },
        "peak_memory_gib": {"rimlab": rimlab_mem} if gpu else None,
        "data_images_per_s": data_ips,
    }
    print(f"{'variant':<8} {'ms/step':>10} {'images/s':>10} {'TFLOP/s':>9} {'MFU %':>7}")
    for k in ("rimlab", "hand"):
        print(
            f"{k:<8} {result['ms_per_step'][k]:>10.1f} {result['images_per_s'][k]:>10.1f} "
            f"{result['tflops_achieved'][k]:>9.2f} {result['mfu_percent'][k]:>7.2f}"
        )
    if "same_maths" in hand_times:
        same_s = statistics.median(hand_times["same_maths"])
        result["ms_per_step"]["same_maths"] = 1000 * same_s
        result["rimlab_minus_same_maths_ms"] = 1000 * (rimlab_s - same_s)
        result["same_maths_minus_hand_ms"] = 1000 * (same_s - hand_s)
        print(
            f"same_maths {1000 * same_s:>8.1f} ms/step: rimlab - same_maths "
            f"{result['rimlab_minus_same_maths_ms']:+.2f} ms (Lightning and glue), same_maths - "
            f"hand {result['same_maths_minus_hand_ms']:+.2f} ms (rimlab's extra maths)"
        )
    print(
        f"rimlab vs hand loop: {result['rimlab_vs_hand_percent']:+.1f}% "
        f"({result['rimlab_minus_hand_ms']:+.1f} ms/step); "
        f"{result['gflop_per_image']:.1f} GFLOP/image"
        + (f"; data pipeline alone {data_ips:.1f} images/s" if data_ips else "")
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
