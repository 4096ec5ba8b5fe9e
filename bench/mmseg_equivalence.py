"""rimlab's ``*_mmseg`` nets against mmsegmentation's own implementation: same weights, same logits.

Needs mmsegmentation 1.2 with mmcv-lite and mmengine (not rimlab dependencies; docs/mmseg.md):

    python -m venv /tmp/mmseg && /tmp/mmseg/bin/pip install torch torchvision \
        "mmsegmentation==1.2.2" "mmcv-lite==2.1.0" "mmengine==0.10.7" ftfy regex
    PYTHONPATH=$PWD /tmp/mmseg/bin/python bench/mmseg_equivalence.py [--size 128 256] [--depth 101]

For each of mmsegmentation's Cityscapes configs ``pspnet``/``deeplabv3plus``/``danet``
``_r50-d8_4xb2-40k_cityscapes-512x1024`` (``_r101`` with ``--depth 101``; read from the installed package; SyncBN -> BN on one
CPU process), the script builds mmsegmentation's ``EncoderDecoder``, draws random weights for every
tensor (BatchNorm statistics and the attention scales included, so that nothing is the identity),
saves them as an mmsegmentation checkpoint, loads that file into rimlab's net
(``conf/model/<net>_r<depth>_mmseg.yaml``) through ``lightning_modules.mmseg_weights`` and compares, in
fp32:

- ``predict``: mmsegmentation's test path from a uint8 BGR image (``SegDataPreProcessor``:
  BGR -> RGB, mean/std, then ``EncoderDecoder.predict``: whole-image inference, logits resized to
  the image) against rimlab's evaluation transform (``build_eval_transform``: RGB, ImageNet
  mean/std) and the net in eval mode;
- ``train``: the training forward with batch statistics (dropout set to 0 on both sides), every
  output of the decode and auxiliary heads (DANet: ``pam_cam``, ``pam``, ``cam``) resized to the
  input as mmsegmentation's loss resizes them, against rimlab's ``out``/``aux``/``pam``/``cam``.

The functional reference of the CI tests (``tests/mmseg_reference.py``, written from
mmsegmentation's definitions) is compared with mmsegmentation on the ``predict`` input as well
(``reference/predict``).

Prints the max abs difference, the logit range and the arg-max agreement per net and output;
``--json`` writes them. Exit status 1 if a difference reaches ``--tol`` (default 1e-4).
mmcv's compiled ops (``mmcv.ops``) are not installed with mmcv-lite; these models use none of
them, so the module is stubbed before mmsegmentation is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NETS = ("pspnet", "deeplabv3plus", "danet")


def config_file(name: str, depth: int) -> str:
    """mmsegmentation's config of the net (relative to its configs folder)."""
    return f"{name}/{name}_r{depth}-d8_4xb2-40k_cityscapes-512x1024.py"


def stub_mmcv_ops() -> None:
    """mmcv-lite has no compiled ops; mmsegmentation imports a few names from them at import time
    (heads these models do not use). Any use of a stub raises."""

    class _Missing:
        def __init__(self, *args, **kwargs) -> None:
            raise RuntimeError("mmcv.ops is stubbed (mmcv-lite): this op is not available")

    module = types.ModuleType("mmcv.ops")
    for name in (
        "point_sample",
        "sigmoid_focal_loss",
        "PSAMask",
        "CrissCrossAttention",
        "DeformConv2d",
        "ModulatedDeformConv2d",
    ):
        setattr(module, name, _Missing)
    sys.modules["mmcv.ops"] = module


def mmseg_model(name: str, depth: int):
    """mmsegmentation's EncoderDecoder of the published config, BN instead of SyncBN."""
    import mmseg
    from mmengine import Config, ConfigDict
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules()
    configs = Path(mmseg.__file__).parent / ".mim" / "configs"
    cfg = Config.fromfile(str(configs / config_file(name, depth)))
    model_cfg = cfg.model
    model_cfg.pretrained = None
    model_cfg.backbone.init_cfg = None
    text = json.dumps(model_cfg.to_dict()).replace('"SyncBN"', '"BN"')
    return MODELS.build(ConfigDict(json.loads(text))), cfg


def randomise(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Random values for every tensor, scaled so that activations stay O(1) through ResNet-50."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(1000)
        elif key.endswith("running_mean"):
            out[key] = 0.1 * torch.randn(value.shape, generator=g)
        elif key.endswith(("running_var", "gamma.scale")):
            out[key] = 0.5 + torch.rand(value.shape, generator=g)
        elif value.dim() == 1 and key.endswith(".bias"):
            out[key] = 0.1 * torch.randn(value.shape, generator=g)
        elif value.dim() == 1:  # BN weights; the residual branches' (bn3) small, so that
            # 16 blocks of random weights do not blow the features up
            scale = 0.2 if ".bn3." in key or "downsample.1" in key else 1.0
            out[key] = scale * (0.5 + 0.5 * torch.rand(value.shape, generator=g))
        else:
            fan_in = value[0].numel()
            out[key] = torch.randn(value.shape, generator=g) * (2.0 / fan_in) ** 0.5
    return out


def rimlab_net(name: str, depth: int):
    import hydra
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ROOT / "conf" / "model" / f"{name}_r{depth}_mmseg.yaml")
    cfg.num_classes = 19
    cfg.pretrained = False
    return hydra.utils.instantiate(cfg)


def zero_dropout(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.p = 0.0


def report(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    return {
        "max_abs_diff": float((a - b).abs().max()),
        "max_abs_logit": float(b.abs().max()),
        "argmax_agreement": float((a.argmax(1) == b.argmax(1)).float().mean()),
    }


def compare(name: str, depth: int, size: tuple[int, int], seed: int) -> dict[str, dict[str, float]]:
    from mmseg.structures import SegDataSample

    from datamodules.transforms import build_eval_transform
    from lightning_modules.mmseg_weights import load_mmseg_state, map_mmseg_state

    torch.manual_seed(seed)
    model, cfg = mmseg_model(name, depth)
    state = randomise(model.state_dict(), seed)
    model.load_state_dict(state, strict=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{name}.pth")
        torch.save({"meta": {"CLASSES": list(range(19))}, "state_dict": state}, path)
        net = rimlab_net(name, depth)
        net.load_state_dict(map_mmseg_state(load_mmseg_state(path), net, path), strict=True)
    results: dict[str, dict[str, float]] = {}

    # -- predict: uint8 image -> mmseg's preprocessing + predict vs rimlab's transform + net
    h, w = size
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    model.eval()
    net.eval()
    sample = SegDataSample(metainfo={"img_shape": (h, w), "ori_shape": (h, w)})
    bgr = torch.from_numpy(np.ascontiguousarray(rgb[..., ::-1])).permute(2, 0, 1)
    with torch.no_grad():
        data = model.data_preprocessor({"inputs": [bgr], "data_samples": [sample]}, False)
        ref = model.predict(data["inputs"], data["data_samples"])[0].seg_logits.data[None]
        image = build_eval_transform()({"image": rgb, "mask": np.zeros((h, w), np.int64)})
        ours = net(image["image"][None])["out"]
    results["predict"] = report(ours, ref)

    # -- the CI tests' functional reference (tests/mmseg_reference.py) against mmseg itself
    sys.path.insert(0, str(ROOT / "tests"))
    import mmseg_reference

    head = {"pspnet": "psp", "deeplabv3plus": "aspp", "danet": "da"}[name]
    with torch.no_grad():
        ref_eval = mmseg_reference.forward(state, data["inputs"], head, depth)["out"]
    results["reference/predict"] = report(ref_eval, ref)

    # -- train: batch statistics, dropout off, every head output resized to the input
    zero_dropout(model)
    zero_dropout(net)
    model.train()
    net.train()
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        feats = model.extract_feat(x)
        decode = model.decode_head.forward(feats)
        aux = model.auxiliary_head.forward(feats)
        ours = net(x)

    def up(t: torch.Tensor) -> torch.Tensor:  # as mmseg's loss_by_feat resizes the logits
        return F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)

    ref_outputs = {"aux": up(aux)}
    if name == "danet":
        ref_outputs.update(out=up(decode[0]), pam=up(decode[1]), cam=up(decode[2]))
    else:
        ref_outputs["out"] = up(decode)
    if set(ours) != set(ref_outputs):
        raise SystemExit(f"{name}: rimlab outputs {sorted(ours)}, mmseg {sorted(ref_outputs)}")
    for key, ref in ref_outputs.items():
        results[f"train/{key}"] = report(ours[key], ref)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, nargs=2, default=(128, 256), metavar=("H", "W"))
    parser.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    parser.add_argument("--depth", type=int, default=50, choices=(50, 101))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    stub_mmcv_ops()
    import mmcv
    import mmengine
    import mmseg

    torch.set_num_threads(max(1, torch.get_num_threads()))
    versions = {
        "mmseg": mmseg.__version__,
        "mmcv": mmcv.__version__,
        "mmengine": mmengine.__version__,
        "torch": torch.__version__,
    }
    print("versions:", versions, "input:", tuple(args.size), "depth:", args.depth)
    all_results = {"versions": versions, "size": list(args.size), "depth": args.depth, "nets": {}}
    worst = 0.0
    for name in args.nets:
        results = compare(name, args.depth, tuple(args.size), args.seed)
        all_results["nets"][name] = results
        for output, r in results.items():
            worst = max(worst, r["max_abs_diff"])
            print(
                f"{name:14s} {output:14s} max|diff| {r['max_abs_diff']:.3e}  "
                f"max|logit| {r['max_abs_logit']:8.3f}  argmax agree {r['argmax_agreement']:.6f}"
            )
    if args.json is not None:
        args.json.write_text(json.dumps(all_results, indent=2))
    ok = worst < args.tol
    print(f"worst max|diff| {worst:.3e} {'<' if ok else '>='} tol {args.tol:g}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
