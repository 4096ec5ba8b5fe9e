"""RIM stage 2 for every net of the zoo: the outputs the loss drops have frozen heads, the ones it
keeps (DANet's pam/cam side outputs) still train, and every trainable parameter gets a gradient
(what DDP without ``find_unused_parameters`` requires)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
from cfg_utils import TINY, compose_cfg
from torch.nn.parallel import DistributedDataParallel

from experiments.build import build_module
from experiments.rim import stage2_overrides
from lightning_modules import ParsingLitModule

NETS = ["pspnet", "deeplabv3plus", "danet"]
RIM = [*TINY, "schedule=rim", "sampler=arbs", "loss=ce_ilm"]


def rim_module(name: str, tmp_path, stage2: bool = True) -> ParsingLitModule:
    """The RIM stage-2 module (or, ``stage2=False``, the baseline's) of the lite ``name`` net."""
    cfg = compose_cfg([*RIM, f"model={name}_lite"], tmp_path)
    torch.manual_seed(0)
    module = build_module(cfg, stage2_overrides(cfg) if stage2 else None)
    if module.sampler is not None:
        # What the stage-1 CPA snapshot provides; any positive statistics do.
        module.sampler.set_statistics(torch.linspace(0.2, 0.9, module.num_classes))
    if name == "danet":
        # After stage 1 the attention scales are nonzero (at 0 the query/key convs get a zero
        # gradient); this makes the check see the attention weights as stage 2 does.
        with torch.no_grad():
            module.net.pam.gamma.fill_(0.5)
            module.net.cam.gamma.fill_(0.5)
    return module.train()


def batch(module: ParsingLitModule, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    target = torch.randint(0, module.num_classes, (2, 33, 41), generator=gen)
    target[:, :3] = 255  # some unlabelled pixels
    return {"image": torch.randn(2, 3, 33, 41, generator=gen), "mask": target}


def frozen_heads(net: torch.nn.Module) -> list[str]:
    """The training-only outputs whose heads have no trainable parameter."""
    heads = {"aux": net.aux_head}
    if hasattr(net, "pam_head"):
        heads.update(pam=net.pam_head, cam=net.cam_head)
    return [k for k, head in heads.items() if not any(p.requires_grad for p in head.parameters())]


def ungraded(net: torch.nn.Module) -> list[str]:
    """Trainable parameters without a finite gradient."""
    return [
        n
        for n, p in net.named_parameters()
        if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())
    ]


@pytest.mark.parametrize("name", NETS)
def test_stage2_step_reaches_every_trainable_parameter(name: str, tmp_path) -> None:
    module = rim_module(name, tmp_path)
    net = module.net
    assert module.loss.aux_weight == 0 and net.frozen_encoder
    assert frozen_heads(net) == ["aux"]
    assert not any(p.requires_grad for p in net.encoder_parameters())

    data = batch(module)
    outputs = module(data["image"])
    expected = {"out", "pam", "cam"} if name == "danet" else {"out"}
    assert set(outputs) == expected
    loss = module.training_step(data, 0)
    loss.backward()
    assert torch.isfinite(loss)
    assert not ungraded(net)
    if name == "danet":
        # The side heads sit on the decoder: they keep training, with the baseline's weight.
        assert module.loss.side_weight > 0
        assert {"loss/pam", "loss/cam"} <= set(module._last_losses)


@pytest.mark.parametrize("name", NETS)
def test_baseline_and_stage2_score_the_same_side_outputs(name: str, tmp_path) -> None:
    """The baseline continuation and RIM stage 2 differ in aux only, not in pam/cam."""
    baseline = rim_module(name, tmp_path / "baseline", stage2=False)
    stage2 = rim_module(name, tmp_path / "stage2")
    assert frozen_heads(baseline.net) == [] and frozen_heads(stage2.net) == ["aux"]
    assert baseline.loss.side_weight == stage2.loss.side_weight
    assert baseline.loss.side_outputs == stage2.loss.side_outputs
    image = batch(baseline)["image"]
    base_keys, stage2_keys = set(baseline(image)), set(stage2(image))
    assert base_keys - stage2_keys == {"aux"} and stage2_keys <= base_keys


@pytest.mark.parametrize(
    ("aux_weight", "side_weight", "side_outputs", "frozen", "keys"),
    [
        (0.4, 1.0, ("pam", "cam"), [], {"out", "aux", "pam", "cam"}),
        (0.0, 0.0, ("pam", "cam"), ["aux", "pam", "cam"], {"out"}),
        (0.4, 0.0, ("pam", "cam"), ["pam", "cam"], {"out", "aux"}),
        # cam is computed with pam but not scored: its head must not wait for a gradient
        (0.0, 1.0, ("pam",), ["aux", "cam"], {"out", "pam", "cam"}),
    ],
)
def test_danet_heads_follow_the_loss_weights(
    aux_weight, side_weight, side_outputs, frozen, keys
) -> None:
    from lightning_modules.nets import DANet
    from losses import CrossEntropyLoss, ParsingLoss

    torch.manual_seed(0)
    net = DANet(5, backbone="lite", inter_channels=16, aux_channels=8)
    loss = ParsingLoss(
        CrossEntropyLoss(),
        aux_weight=aux_weight,
        side_weight=side_weight,
        side_outputs=side_outputs,
    )
    module = ParsingLitModule(net=net, loss=loss, optimizer=None, num_classes=5).train()
    assert frozen_heads(net) == frozen
    data = batch(module)
    outputs = module(data["image"])
    assert set(outputs) == keys
    loss(outputs, data["mask"])["loss"].backward()
    assert not ungraded(net)
    assert module.frozen_heads == frozen


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_danet_stage2_under_ddp_without_find_unused_parameters(tmp_path) -> None:
    """Two stage-2 steps through DistributedDataParallel(find_unused_parameters=False), as
    Lightning's DDP strategy runs them: an unused trainable parameter fails the second step."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    module = rim_module("danet", tmp_path)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        ddp = DistributedDataParallel(module.net, find_unused_parameters=False)
        params = [p for p in module.net.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.01)
        for step in range(2):
            data = batch(module, seed=step)
            optimizer.zero_grad()
            losses = module.loss(ddp(data["image"]), data["mask"])
            losses["loss"].backward()
            optimizer.step()
        assert not ungraded(module.net)
        assert {"loss/pam", "loss/cam"} <= set(losses)
    finally:
        dist.destroy_process_group()
