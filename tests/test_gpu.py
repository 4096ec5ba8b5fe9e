"""GPU checks (``-m gpu``; skipped without CUDA, run by ``bench/device_check.sh``), and the CPU
halves of what they compare."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import open_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import train_step  # noqa: E402

from experiments.predict import Parser, PredictError  # noqa: E402
from lightning_modules.metrics import ConfusionMatrix, segmentation_scores  # noqa: E402

gpu = pytest.mark.gpu


class _PoolNet(torch.nn.Module):
    """Scores at 1/4 resolution from a 1x1 convolution; classes 2 and 3 score identically."""

    def __init__(self, classes: int = 7) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, classes, 1)
        with torch.no_grad():
            self.conv.weight[3] = self.conv.weight[2]
            self.conv.bias[3] = self.conv.bias[2]

    def forward(self, x):
        return {"out": self.conv(F.avg_pool2d(x, 4))}


def _parser(net: torch.nn.Module, device: str, fast: bool = False, classes: int = 7) -> Parser:
    return Parser(
        net=net.to(device).eval(),
        num_classes=classes,
        class_names=[str(i) for i in range(classes)],
        palette=np.zeros((classes, 3), np.uint8),
        device=torch.device(device),
        bf16=fast,
        channels_last=fast,
    )


@pytest.mark.parametrize("chunk", [1 << 26, 2 * 37 * 53, 37 * 53])
def test_chunked_argmax_equals_the_full_scores_argmax(chunk):
    """The class-chunked arg-max gives exactly the ids of the full scores, ties included (classes
    2 and 3 tie everywhere: 2 must win, also when they fall into different chunks)."""
    parser = _parser(_PoolNet(), "cpu")
    parser.argmax_chunk_elements = chunk
    image = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    full = parser.scores(image).argmax(0)
    assert torch.equal(parser.labels(image), full)
    assert (full == 2).any() and not (full == 3).any()
    ids, scores = parser.predict(image, with_scores=False)
    assert scores is None and np.array_equal(ids, full.numpy().astype(np.uint8))


@pytest.mark.parametrize("keep_ratio", [False, True])
def test_predict_batch_gives_each_frames_own_ids(keep_ratio):
    """Three frames in one network pass (a small arg-max chunk: two classes at a time over the
    batch) give the ids each frame gets alone, also letterboxed into a fixed input."""
    parser = _parser(_PoolNet(), "cpu")
    if keep_ratio:
        parser = dataclasses.replace(parser, eval_size=(32, 32), keep_ratio=True)
    parser.argmax_chunk_elements = 2 * 3 * 37 * 53
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (37, 53, 3), dtype=np.uint8) for _ in range(3)]
    batch = parser.predict_batch(frames)
    assert len(batch) == 3
    for frame, ids in zip(frames, batch, strict=True):
        alone = parser.scores(frame).argmax(0).numpy().astype(np.uint8)
        assert ids.dtype == np.uint8 and np.array_equal(ids, alone)
    assert not np.array_equal(batch[0], batch[1])


def test_stream_batches_split_where_the_frame_size_changes():
    from experiments.predict import _batches

    shapes = [(4, 4, 3)] * 3 + [(6, 4, 3)] * 2 + [(4, 4, 3)]
    frames = iter(np.zeros(shape, np.uint8) for shape in shapes)
    sizes = [[f.shape[0] for f in batch] for batch in _batches(frames, 2)]
    assert sizes == [[4, 4], [4], [6, 6], [4]]


def test_predict_batch_refuses_frames_of_different_sizes():
    parser = _parser(_PoolNet(), "cpu")
    frames = [np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.uint8)]
    with pytest.raises(PredictError, match=r"one size, got \[\(8, 8, 3\), \(8, 9, 3\)\]"):
        parser.predict_batch(frames)


# ---------------------------------------------------------------------- on a GPU


class _Losses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _stage_module(tmp_path, stage: int, model: str, size: int, batch: int, extra=(), **module):
    """``(cfg, module)`` of a stage-1 or stage-2 (ARBS + ILM, with an early confusion matrix
    whose recall falls from 0.9 to 0.05 over the classes) run on ``size`` crops; ``module``
    sets ``cfg.module`` keys."""
    overrides = ["experiment=pspnet_mhp", "data=synthetic_mhp", f"model={model}", *extra]
    if stage == 2:
        overrides += ["sampler=arbs", "loss=ce_ilm", "schedule=rim"]
    cfg = train_step.compose_config(overrides, size, batch, tmp_path / "data")
    with open_dict(cfg):
        cfg.module.update(module)
    stage_overrides = None
    if stage == 2:
        from experiments.rim import stage2_overrides

        stage_overrides = stage2_overrides(cfg)
    built = train_step.build_module(cfg, stage_overrides)
    if stage == 2:
        classes = int(cfg.data.num_classes)
        recall = torch.linspace(0.9, 0.05, classes, dtype=torch.float64)
        confusion = torch.diag((1000 * recall).long())
        confusion[:, 0] += (1000 * (1 - recall)).long()
        built.early_confusion.copy_(confusion)
        built.early_cpa_epoch.fill_(3)
    return cfg, built


def _gpu_losses(tmp_path, stage: int, model: str, steps: int = 8, compile: bool = False) -> list:
    """Losses of ``steps`` bf16 + channels_last steps on one synthetic batch, repeated."""
    extra = ["model.pretrained=false", "optimizer=sgd", "optimizer.lr=0.01"]
    cfg, module = _stage_module(
        tmp_path, stage, model, 128, 4, extra, channels_last=True, compile=compile
    )
    batch = train_step.make_batches(1, 4, 128, int(cfg.data.num_classes), torch.device("cpu"))[0]
    losses = _Losses()
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[losses],
    )
    trainer.fit(module, train_dataloaders=train_step._Batches([batch] * steps))
    return losses.losses


def _falls(losses: list[float]) -> bool:
    return all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3])


@gpu
@pytest.mark.parametrize("stage", [1, 2])
def test_gpu_pspnet_r50_bf16_channels_last_trains(tmp_path, stage):
    losses = _gpu_losses(tmp_path, stage, "pspnet_r50")
    assert _falls(losses), losses


@gpu
def test_gpu_compiled_module_trains_and_does_not_recompile_per_switch(tmp_path):
    import torch._dynamo.utils as dynamo_utils

    dynamo_utils.counters.clear()
    losses = _gpu_losses(tmp_path, 1, "pspnet_lite", steps=10, compile=True)
    assert _falls(losses), losses
    first = dynamo_utils.counters["stats"]["unique_graphs"]
    _gpu_losses(tmp_path, 1, "pspnet_lite", steps=4, compile=True)  # a new module: same graphs
    assert first > 0 and dynamo_utils.counters["stats"]["unique_graphs"] <= 2 * first


@gpu
def test_gpu_predict_matches_cpu_float32():
    from lightning_modules.nets import PSPNet

    net = PSPNet(num_classes=7, backbone="lite", aux=False)
    image = np.random.default_rng(0).integers(0, 256, (97, 131, 3), dtype=np.uint8)
    ids_cpu, _ = _parser(net, "cpu").predict(image)
    gpu_net = PSPNet(num_classes=7, backbone="lite", aux=False)
    gpu_net.load_state_dict(net.state_dict())
    fast = _parser(gpu_net.to(memory_format=torch.channels_last), "cuda", fast=True)
    ids_gpu, _ = fast.predict(image, with_scores=False)
    assert torch.equal(fast.labels(image), fast.scores(image).argmax(0))
    assert (ids_cpu == ids_gpu).mean() > 0.98  # bf16 network, float32 resizing
    # Four frames in one pass (pinned host memory both ways) agree with each frame alone.
    frames = [np.roll(image, 7 * k, axis=1) for k in range(4)]
    batch = fast.predict_batch(frames)
    alone = [fast.predict(f, with_scores=False)[0] for f in frames]
    assert all((b == a).mean() > 0.999 for b, a in zip(batch, alone, strict=True))


@gpu
def test_gpu_onnx_cuda_provider_matches_pytorch(tmp_path):
    from experiments.export import cuda_provider_available, export_onnx, onnx_parity
    from lightning_modules.nets import PSPNet

    if not cuda_provider_available():
        pytest.skip("onnxruntime has no CUDAExecutionProvider here (onnxruntime-gpu)")
    net = PSPNet(num_classes=7, backbone="lite", aux=False).eval()
    path = export_onnx(net, tmp_path / "net.onnx", (64, 64), 18, {})
    assert (
        max(onnx_parity(net, path, [(64, 64), (88, 104)], provider="CUDAExecutionProvider")) < 1e-3
    )


@gpu
def test_gpu_metrics_equal_cpu_metrics_on_the_same_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 19, 64, 80, generator=g)
    target = torch.randint(0, 19, (4, 64, 80), generator=g)
    target[:, :3] = 255
    results = []
    for device in ("cpu", "cuda"):
        metric = ConfusionMatrix(19).to(device)
        metric.update(logits.to(device), target.to(device))
        results.append(metric.compute().cpu())
    assert torch.equal(results[0], results[1])
    assert segmentation_scores(results[0])["mIoU"] == segmentation_scores(results[1])["mIoU"]


def _sync_free_steps(module, batch, steps: int = 3) -> None:
    """One warm-up training step (allocator, cuDNN), then ``steps`` more under CUDA's
    synchronisation debug mode "error": forward, loss, backward, the module's
    ``on_before_optimizer_step`` and the optimizer step may not make the host wait for the
    device."""
    module = module.cuda().train()
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = module.training_step(batch, 0)
        loss.backward()
        module.on_before_optimizer_step(optimizer)
        optimizer.step()

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@gpu
@pytest.mark.parametrize("stage", [1, 2])
def test_gpu_parsing_training_step_never_waits_for_the_device(tmp_path, stage):
    cfg, module = _stage_module(tmp_path, stage, "pspnet_lite", 64, 2)
    module = module.cuda()
    # What on_fit_start does without a trainer: the weights check's parameters, ARBS's table.
    module._trained_parameters = [p for p in module.net.parameters() if p.requires_grad]
    if module.sampler is not None:
        module._init_sampler()
    batch = train_step.make_batches(1, 2, 64, int(cfg.data.num_classes), torch.device("cuda"))[0]
    _sync_free_steps(module, batch)


@gpu
def test_gpu_deepmac_training_step_never_waits_for_the_device():
    """With Gaussian box jitter (drawn on the CPU, copied from pinned memory) and the all-class
    centre loss (targets built on the device)."""
    from test_deepmac import _tiny_deepmac

    from lightning_modules.deepmac import DeepMACLitModule
    from losses.centernet import CentreHeatmapLoss
    from losses.mask import MaskLoss

    torch.manual_seed(0)
    module = DeepMACLitModule(
        _tiny_deepmac(num_centre_classes=2, box_jitter=0.05),
        MaskLoss([1], dice_weight=0.5),
        lambda params: torch.optim.SGD(params, lr=1e-3),
        centre_loss=CentreHeatmapLoss(class_ids=[1, 2]),
    )
    g = torch.Generator().manual_seed(1)
    boxes = [torch.tensor([[2.0, 3.0, 20.0, 25.0], [10.0, 4.0, 30.0, 30.0]]), torch.zeros(0, 4)]
    batch = {
        "image": torch.randn(2, 3, 32, 32, generator=g).cuda(),
        "boxes": [b.cuda() for b in boxes],
        "masks": [(torch.rand(len(b), 32, 32, generator=g) > 0.5).float().cuda() for b in boxes],
        "labels": [torch.tensor([1, 2]).cuda(), torch.zeros(0, dtype=torch.long).cuda()],
    }
    _sync_free_steps(module, batch)
