"""Extra cost of ARBS + ILM over plain cross-entropy in one RIM stage-2 training step.

    python bench/rim_overhead.py                          # GPU defaults: PSPNet-R50, 400x400, B=16
    python bench/rim_overhead.py --device cpu --backbone 18 --size 96 --batch 4 --steps 5

Both variants run the same stage-2 step (encoder frozen, BatchNorm in eval, no auxiliary head,
SGD): forward, loss, backward, optimizer step, on random images and labels already on the device.
``ce`` uses cross-entropy only; ``arbs_ilm`` draws the regional sampling mask (ARBS keep probabilities
from a long-tailed CPA vector) and adds the inter-class loss, with the main loss divided by every
labelled pixel (``loss.main_normalizer=labelled``, the default); ``arbs_ilm_kept`` is the same with the
mean over the kept pixels only (``kept``), so the cost of the normaliser is measured in the same run.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lightning_modules.nets import PSPNet
from losses import CrossEntropyLoss, InterClassLoss, ParsingLoss
from samplers import RegionalBalancedSampler


def _step_fn(net, loss_fn, sampler, optimizer, images, targets, autocast):
    def step() -> None:
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=autocast):
            outputs = net(images)
            mask = sampler(targets) if sampler is not None else None
            losses = loss_fn(outputs, targets, sample_mask=mask)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()

    return step


def _time(step, device: torch.device, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", type=int, default=50)
    parser.add_argument("--size", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--classes", type=int, default=59)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds per variant")
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast (default: on for CUDA)",
    )
    parser.add_argument("--json", type=Path, default=Path("bench/results/rim_overhead.json"))
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    autocast = args.bf16 if args.bf16 is not None else device.type == "cuda"
    torch.manual_seed(0)
    net = PSPNet(args.classes, backbone=args.backbone, pretrained=False).to(device)
    net.freeze_encoder()
    net.use_aux = False
    net.train()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        net = net.to(memory_format=torch.channels_last)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    # Long-tailed labels: class c with probability ~ 1 / (c + 1).
    weights = 1.0 / torch.arange(1, args.classes + 1, dtype=torch.float)
    targets = torch.multinomial(weights, args.batch * args.size * args.size, replacement=True)
    targets = targets.view(args.batch, args.size, args.size).to(device)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)

    sampler = RegionalBalancedSampler(args.classes, source="arbs").to(device)
    cpa = torch.linspace(0.9, 0.05, args.classes, dtype=torch.float64)
    sampler.set_statistics(cpa.to(device))

    def arbs_ilm_loss(normalizer: str) -> ParsingLoss:
        return ParsingLoss(
            CrossEntropyLoss(),
            aux_weight=0.0,
            ilm=InterClassLoss(margin=1.0),
            ilm_weight=1.0,
            main_normalizer=normalizer,
        )

    variants = {
        "ce": _step_fn(
            net,
            ParsingLoss(CrossEntropyLoss(), aux_weight=0.0),
            None,
            optimizer,
            images,
            targets,
            autocast,
        ),
        "arbs_ilm": _step_fn(
            net, arbs_ilm_loss("labelled"), sampler, optimizer, images, targets, autocast
        ),
        "arbs_ilm_kept": _step_fn(
            net, arbs_ilm_loss("kept"), sampler, optimizer, images, targets, autocast
        ),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        # Alternate the variants so drifting clocks and caches hit both alike.
        for name, step in variants.items():
            times[name].append(_time(step, device, args.warmup, args.steps))
    best = {k: min(v) for k, v in times.items()}
    overhead = 100.0 * (best["arbs_ilm"] - best["ce"]) / best["ce"]
    normalizer = 100.0 * (best["arbs_ilm"] - best["arbs_ilm_kept"]) / best["arbs_ilm_kept"]
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "config": {k: v for k, v in vars(args).items() if k != "json"} | {"bf16": autocast},
        "ms_per_step": {k: 1000 * v for k, v in best.items()},
        "images_per_s": {k: args.batch / v for k, v in best.items()},
        "overhead_percent": overhead,
        "labelled_vs_kept_normalizer_percent": normalizer,
    }
    print(f"{'variant':<14} {'ms/step':>10} {'images/s':>10}")
    for k in variants:
        print(f"{k:<14} {1000 * best[k]:>10.1f} {args.batch / best[k]:>10.1f}")
    print(f"ARBS + ILM overhead: {overhead:+.1f}% of the CE step (target <= 5% on the GPU)")
    print(f"labelled normaliser vs kept: {normalizer:+.1f}% of the step")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
