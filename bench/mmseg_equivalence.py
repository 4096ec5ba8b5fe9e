"""rimlab's ``*_mmseg`` nets against mmsegmentation's own implementation: same weights, same logits.

Needs mmsegmentation 1.2 with mmcv-lite and mmengine (not rimlab dependencies; docs/mmseg.md):

    python -m venv /tmp/mmseg && /tmp/mmseg/bin/pip install torch torchvision \
        "mmsegmentation==1.2.2" "mmcv-lite==2.1.0" "mmengine==0.10.7" ftfy regex
    PYTHONPATH=$PWD /tmp/mmseg/bin/python bench/mmseg_equivalence.py [--size 128 256] [--depth 101]
    PYTHONPATH=$PWD /tmp/mmseg/bin/python bench/mmseg_equivalence.py --config 769x769 \
        [--size 1024 2048 | --shrink 8 --size 128 256]

For each of mmsegmentation's Cityscapes configs ``pspnet``/``deeplabv3plus``/``danet``
``_r50-d8_4xb2-40k_cityscapes-<config>`` (``_r101`` with ``--depth 101``; read from the installed
package; SyncBN -> BN on one CPU process), the script builds mmsegmentation's ``EncoderDecoder``,
draws random weights for every tensor (BatchNorm statistics and the attention scales included, so
that nothing is the identity), saves them as an mmsegmentation checkpoint, loads that file with
``experiments.predict.load_parser`` (``model=<net>_r<depth>_mmseg``, ``_769`` for the 769x769
configs; ``data=cityscapes``) and compares, in fp32:

- ``predict``: mmsegmentation's whole test path from a uint8 BGR image (the config's test
  ``Resize``, ``SegDataPreProcessor``: BGR -> RGB, mean/std, then ``EncoderDecoder.predict``:
  whole-image or sliding-window inference as the config's ``test_cfg`` says, logits resized to
  the image with the heads' ``align_corners``) against rimlab's predict (``Parser.scores``: the
  evaluation transform, the normalisation, the protocol, ``scores_to_original``). 512x1024
  configs: the image at its own size on both sides (their test resize to 2048x1024 is the
  identity for Cityscapes frames; ``tests/test_scale_protocol.py`` checks rimlab's), whole-image
  inference, ``eval=default``. 769x769 configs: ``size=[1025, 2049]``,
  ``eval=mmseg_slide_769`` (the config's 2049x1025 keep-ratio resize, 769x769 windows with stride
  513 and align_corners=True);
- ``reference/*``: the CI tests' functional reference (``tests/mmseg_reference.py``, written from
  mmsegmentation's definitions) on mmsegmentation's normalised input: the whole image
  (512x1024), or one window and the whole slide (769x769);
- ``train/*``: the training forward on a crop-sized batch of 2 with batch statistics (dropout set
  to 0 on both sides), every output of the decode and auxiliary heads (DANet: ``pam_cam``,
  ``pam``, ``cam``) resized to the input as mmsegmentation's loss resizes them, against rimlab's
  ``out``/``aux``/``pam``/``cam``.

``--shrink k`` divides the 769x769 geometry for CPUs: every size ``s = 8n + 1`` of it (the resize
scale 2049x1025, the crop 769, the stride 513) becomes ``(s - 1) / k + 1`` on both sides (with
``k = 8``: 257x129, 97, 65, so a 128x256 image slides the same 2 x 4 windows as a 1024x2048 frame).

Prints the max abs difference, the logit range and the arg-max agreement per net and output;
``--json`` writes them (default
``bench/results/mmseg_equivalence_<config>_<H>x<W>_r<depth>.json``). Exit status 1 if a difference
reaches ``--tol`` (default 1e-4). mmcv's compiled ops (``mmcv.ops``) are not installed with
mmcv-lite; these models use none of them, so the module is stubbed before
mmsegmentation is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NETS = ("pspnet", "deeplabv3plus", "danet")
CONFIGS = ("512x1024", "769x769")
HEADS = {"pspnet": "psp", "deeplabv3plus": "aspp", "danet": "da"}


def config_file(name: str, depth: int, config: str) -> str:
    """mmsegmentation's config of the net (relative to its configs folder)."""
    return f"{name}/{name}_r{depth}-d8_4xb2-40k_cityscapes-{config}.py"


def rimlab_model(name: str, depth: int, config: str) -> str:
    """The conf/model name of the net."""
    return f"{name}_r{depth}_mmseg" + ("_769" if config == "769x769" else "")


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


def shrunk(value: int, k: int) -> int:
    """``(value - 1) / k + 1`` for the ``8n + 1`` sizes of the 769x769 geometry."""
    if (value - 1) % k:
        raise SystemExit(f"--shrink {k}: {value} - 1 is not a multiple of {k}")
    return (value - 1) // k + 1


def mmseg_model(name: str, depth: int, config: str, shrink: int):
    """mmsegmentation's EncoderDecoder of the published config (BN instead of SyncBN) and the
    config; with ``shrink`` > 1 the test resize scale, crop and stride shrunk (see ``shrunk``)."""
    import mmseg
    from mmengine import Config, ConfigDict
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules()
    configs = Path(mmseg.__file__).parent / ".mim" / "configs"
    cfg = Config.fromfile(str(configs / config_file(name, depth, config)))
    model_cfg = cfg.model
    model_cfg.pretrained = None
    model_cfg.backbone.init_cfg = None
    if shrink > 1:
        test = model_cfg.test_cfg
        test.crop_size = tuple(shrunk(v, shrink) for v in test.crop_size)
        test.stride = tuple(shrunk(v, shrink) for v in test.stride)
        resize = test_resize(cfg)
        resize.scale = tuple(shrunk(v, shrink) for v in resize.scale)
    text = json.dumps(model_cfg.to_dict()).replace('"SyncBN"', '"BN"')
    return MODELS.build(ConfigDict(json.loads(text))), cfg


def test_resize(cfg):
    """The ``Resize`` of the config's test pipeline, or None (the 512x1024 configs' 2048x1024
    keep-ratio resize is in the pipeline too; it is the identity only for 1024x2048 frames)."""
    for step in cfg.test_pipeline:
        if step["type"] == "Resize":
            return step
    return None


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


def mmseg_test_input(model, cfg, rgb: np.ndarray, resize: bool):
    """mmsegmentation's test pipeline on an RGB image: the config's ``Resize`` (mmcv, cv2
    bilinear) when ``resize``, ``PackSegInputs``' HWC -> CHW, then ``SegDataPreProcessor``.
    Returns the preprocessor's output (``inputs`` normalised ``(1, 3, h, w)``,
    ``data_samples``)."""
    from mmseg.registry import TRANSFORMS
    from mmseg.structures import SegDataSample

    h, w = rgb.shape[:2]
    results = {
        "img": np.ascontiguousarray(rgb[..., ::-1]),
        "img_shape": (h, w),
        "ori_shape": (h, w),
    }
    if resize:
        results = TRANSFORMS.build(dict(test_resize(cfg)))(results)
    img = results["img"]
    sample = SegDataSample(metainfo={"img_shape": img.shape[:2], "ori_shape": (h, w)})
    bgr = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
    return model.data_preprocessor({"inputs": [bgr], "data_samples": [sample]}, False)


def compare(
    name: str, depth: int, config: str, size: tuple[int, int], seed: int, shrink: int
) -> dict[str, dict[str, float]]:
    from experiments import predict

    sys.path.insert(0, str(ROOT / "tests"))
    import mmseg_reference

    torch.manual_seed(seed)
    model, cfg = mmseg_model(name, depth, config, shrink)
    align_corners = bool(model.decode_head.align_corners)
    if bool(model.auxiliary_head.align_corners) != align_corners:
        raise SystemExit(f"{config_file(name, depth, config)}: the heads' align_corners differ")
    state = randomise(model.state_dict(), seed)
    model.load_state_dict(state, strict=True)
    model.eval()
    test_cfg = model.test_cfg
    slide = test_cfg.get("mode", "whole") == "slide"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{name}.pth")
        torch.save({"meta": {"CLASSES": list(range(19))}, "state_dict": state}, path)
        if slide:
            resize = test_resize(cfg)
            eval_size = (resize.scale[1], resize.scale[0])  # mmcv's scale is (w, h)
            parser = predict.load_parser(
                path,
                "cpu",
                eval_name="mmseg_slide_769",
                eval_overrides={
                    "crop_size": list(test_cfg.crop_size),
                    "stride": list(test_cfg.stride),
                },
                size=eval_size,
                model=rimlab_model(name, depth, config),
                data="cityscapes",
            )
        else:
            parser = predict.load_parser(
                path, "cpu", eval_name="default", size="original", data="cityscapes"
            )
    net = parser.net
    if net.align_corners != align_corners:
        raise SystemExit(f"{rimlab_model(name, depth, config)}: align_corners {net.align_corners}")
    results: dict[str, dict[str, float]] = {}

    # -- predict: uint8 image -> mmseg's test pipeline + predict vs rimlab's predict
    h, w = size
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    with torch.no_grad():
        # 512x1024 configs: the image at its own size (their 2048x1024 resize would make any
        # test image a full frame); 769x769: the config's 2049x1025 resize, as predict's size
        data = mmseg_test_input(model, cfg, rgb, resize=slide)
        ref = model.predict(data["inputs"], data["data_samples"])[0].seg_logits.data[None]
        ours = parser.scores(rgb)[None]
        # rimlab's network input (resized as mmseg resized) vs mmseg's, before the net
        x, _ = parser.prepare(rgb)
    if ours.shape != ref.shape:
        raise SystemExit(f"{name}: rimlab scores {tuple(ours.shape)}, mmseg {tuple(ref.shape)}")
    results["predict"] = report(ours, ref)
    results["predict"]["input_max_abs_diff"] = float((x - data["inputs"]).abs().max())

    # -- the CI tests' functional reference (tests/mmseg_reference.py) against mmseg itself
    head = HEADS[name]

    def reference(image: torch.Tensor) -> torch.Tensor:
        out = mmseg_reference.forward(state, image, head, depth, align_corners=align_corners)
        return out["out"]

    inputs, metas = data["inputs"], [s.metainfo for s in data["data_samples"]]
    with torch.no_grad():
        if slide:
            ch, cw = test_cfg.crop_size
            window = inputs[:, :, :ch, :cw]
            theirs = model.encode_decode(window, [dict(metas[0], img_shape=window.shape[2:])])
            results["reference/window"] = report(reference(window), theirs)
            theirs = model.slide_inference(inputs, [dict(m) for m in metas])
            ours_slide = mmseg_reference.slide(
                reference, inputs, tuple(test_cfg.crop_size), tuple(test_cfg.stride), 19
            )
            results["reference/slide"] = report(ours_slide, theirs)
        else:
            results["reference/predict"] = report(reference(inputs), ref)

    # -- train: batch statistics, dropout off, every head output resized to the input
    crop = tuple(test_cfg.crop_size) if slide else (h, w)
    zero_dropout(model)
    zero_dropout(net)
    model.train()
    net.train()
    x = torch.randn(2, 3, *crop, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        feats = model.extract_feat(x)
        decode = model.decode_head.forward(feats)
        aux = model.auxiliary_head.forward(feats)
        ours = net(x)

    def up(t: torch.Tensor) -> torch.Tensor:  # as mmseg's loss_by_feat resizes the logits
        return F.interpolate(t, size=crop, mode="bilinear", align_corners=align_corners)

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
    parser.add_argument("--config", default=CONFIGS[0], choices=CONFIGS)
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="the test image (default 128 256 for 512x1024, 1024 2048 for 769x769)",
    )
    parser.add_argument("--shrink", type=int, default=1, help="769x769 geometry divisor")
    parser.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    parser.add_argument("--depth", type=int, default=50, choices=(50, 101))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.shrink != 1 and args.config != "769x769":
        parser.error("--shrink applies to --config 769x769")
    size = tuple(args.size or ((128, 256) if args.config == "512x1024" else (1024, 2048)))
    stub_mmcv_ops()
    import mmcv
    import mmengine
    import mmseg

    from datamodules.files import write_json

    versions = {
        "mmseg": mmseg.__version__,
        "mmcv": mmcv.__version__,
        "mmengine": mmengine.__version__,
        "torch": torch.__version__,
    }
    print(
        "versions:", versions, "config:", args.config, "input:", size, "shrink:", args.shrink,
        "depth:", args.depth, "load:", os.getloadavg(),
    )  # fmt: skip
    all_results = {
        "versions": versions,
        "config": args.config,
        "size": list(size),
        "shrink": args.shrink,
        "depth": args.depth,
        "seed": args.seed,
        "load_before": os.getloadavg(),
        "nets": {},
    }
    worst = 0.0
    start = time.perf_counter()
    for name in args.nets:
        results = compare(name, args.depth, args.config, size, args.seed, args.shrink)
        all_results["nets"][name] = results
        for output, r in results.items():
            worst = max(worst, r["max_abs_diff"])
            print(
                f"{name:14s} {output:17s} max|diff| {r['max_abs_diff']:.3e}  "
                f"max|logit| {r['max_abs_logit']:8.3f}  argmax agree {r['argmax_agreement']:.6f}"
                + (
                    f"  input max|diff| {r['input_max_abs_diff']:.3e}"
                    if output == "predict"
                    else ""
                )
            )
    all_results["seconds"] = time.perf_counter() - start
    all_results["load_after"] = os.getloadavg()
    json_path = args.json or (
        ROOT / "bench" / "results" / f"mmseg_equivalence_{args.config}_{size[0]}x{size[1]}"
        f"_r{args.depth}.json"
    )
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(json_path, all_results, indent=2)
    ok = worst < args.tol
    print(f"worst max|diff| {worst:.3e} {'<' if ok else '>='} tol {args.tol:g}; wrote {json_path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
