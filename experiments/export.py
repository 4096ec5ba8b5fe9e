"""Export the net of a rimlab parsing checkpoint to ONNX with dynamic batch, height and width.

    python -m experiments.export ckpt=<file.ckpt> format=onnx output=<model.onnx> \\
        [weights=auto|net|schp] [opset=18] [check=true] [check_size=[h,w]] [tolerance=1e-4] \\
        [cuda_tolerance=1e-3] [example_size=[h,w]]

The options are ``conf/export.yaml`` (``--help`` lists them), composed by Hydra as ``run.py``'s
are (:mod:`datamodules.cli`); the network comes from :func:`lightning_modules.parser.load_parser`.

The graph maps a normalised image ``image`` ``(B, 3, H, W)`` (RGB, ImageNet mean/std, as the
training data) to ``logits`` ``(B, C, H, W)``. Class names, palette, flip pairs, the input size
validation used, and the normalisation are stored in the model's metadata (``rimlab.*`` keys).

ONNX has no adaptive average pooling for inputs of unknown size (its exporter bakes the pooling
windows of the example input into the graph, which then fails or is wrong at other sizes), so
every ``nn.AdaptiveAvgPool2d`` is swapped for :class:`MatrixAdaptiveAvgPool2d`, the same average
written as two matrix products whose matrices are built from the runtime height and width.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from datamodules.batch import IMAGENET_MEAN, IMAGENET_STD
from datamodules.cli import command
from datamodules.files import atomic_path
from experiments.predict import options
from lightning_modules.parser import Parser, PredictError, load_parser

log = logging.getLogger("rimlab.export")


def adaptive_pool_matrix(size: int, bins: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Averaging matrix of adaptive average pooling along one axis.

    Bin ``i`` averages positions ``floor(i * size / bins) .. ceil((i + 1) * size / bins) - 1``,
    exactly PyTorch's adaptive pooling windows.

    Returns:
        ``(bins, size)`` matrix ``P`` with ``pooled = P @ x`` along that axis.
    """
    i = torch.arange(bins, device=device)
    start = torch.div(i * size, bins, rounding_mode="floor")  # (bins,)
    end = torch.div((i + 1) * size + bins - 1, bins, rounding_mode="floor")  # ceil, (bins,)
    pos = torch.arange(size, device=device)  # (size,)
    inside = (pos[None, :] >= start[:, None]) & (pos[None, :] < end[:, None])  # (bins, size)
    return inside.to(dtype) / (end - start)[:, None].to(dtype)


class MatrixAdaptiveAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d`` as ``P_h @ x @ P_w^T``, exportable with dynamic H and W.

    Args:
        output_size: ``b`` or ``(bh, bw)``.
    """

    def __init__(self, output_size: int | Sequence[int]) -> None:
        super().__init__()
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        self.bh, self.bw = (int(v) for v in output_size)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x: ``(B, C, H, W)``. Returns ``(B, C, bh, bw)``."""
        height, width = x.shape[-2:]
        p_h = adaptive_pool_matrix(height, self.bh, x.dtype, x.device)  # (bh, H)
        p_w = adaptive_pool_matrix(width, self.bw, x.dtype, x.device)  # (bw, W)
        # (bh, H) @ (B, C, H, W) -> (B, C, bh, W); @ (W, bw) -> (B, C, bh, bw)
        return torch.matmul(torch.matmul(p_h, x), p_w.transpose(0, 1))


def exportable(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with every ``AdaptiveAvgPool2d`` replaced by the matrix form."""
    net = copy.deepcopy(net).eval()
    for name, module in list(net.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.AdaptiveAvgPool2d):
                size = child.output_size
                if isinstance(size, Sequence) and any(s is None for s in size):
                    raise PredictError(f"{name}.{child_name}: output size {size} with None")
                setattr(module, child_name, MatrixAdaptiveAvgPool2d(size))
    return net


class LogitsOnly(nn.Module):
    """``image -> net(image)["out"]``: the exported graph has a single tensor output."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: Tensor) -> Tensor:
        """Args: image: ``(B, 3, H, W)`` normalised. Returns logits ``(B, C, H, W)``."""
        return self.net(image)["out"]


def export_onnx(
    net: nn.Module,
    path: str | Path,
    example_size: Sequence[int] = (64, 64),
    opset: int = 18,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Writes ``net`` (eval mode) as ONNX with dynamic batch, height and width.

    Args:
        net: a parsing net returning ``{"out": (B, C, H, W)}``.
        path: the ``.onnx`` file to write.
        example_size: ``(h, w)`` of the tracing input; sizes down to 32 px export.
        opset: ONNX opset version.
        metadata: ``metadata_props`` entries (string values).

    Returns:
        The path written.
    """
    import onnx

    path = Path(path)
    model = LogitsOnly(exportable(net)).eval().cpu()
    example = torch.randn(1, 3, *(int(s) for s in example_size))
    dims = {
        0: torch.export.Dim("batch", min=1, max=1024),
        2: torch.export.Dim("height", min=32, max=8192),
        3: torch.export.Dim("width", min=32, max=8192),
    }
    with torch.no_grad(), atomic_path(path) as tmp:
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            dynamo=True,
            opset_version=opset,
            input_names=["image"],
            output_names=["logits"],
            dynamic_shapes={"image": dims},
            external_data=False,
        )
        if metadata:
            proto = onnx.load(str(tmp))
            for key, value in metadata.items():
                entry = proto.metadata_props.add()
                entry.key, entry.value = key, value
            onnx.save(proto, str(tmp))
    return path


def cuda_provider_available() -> bool:
    """Whether onnxruntime can run on a GPU here (an onnxruntime-gpu build and a CUDA device)."""
    import onnxruntime as ort

    return torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()


def onnx_parity(
    net: nn.Module,
    path: str | Path,
    sizes: Sequence[Sequence[int]],
    seed: int = 0,
    provider: str = "CPUExecutionProvider",
) -> list[float]:
    """Max absolute logit difference between onnxruntime (on ``provider``: the CPU, or
    ``CUDAExecutionProvider``) and PyTorch on the CPU at each ``(h, w)``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=[provider])
    if provider not in session.get_providers():
        raise PredictError(f"onnxruntime could not start {provider} for {path}")
    generator = torch.Generator().manual_seed(seed)
    net = net.eval().cpu()
    diffs = []
    for h, w in sizes:
        x = torch.randn(1, 3, int(h), int(w), generator=generator)
        with torch.no_grad():
            ref = net(x)["out"].numpy()
        out = session.run(["logits"], {"image": x.numpy()})[0]
        if out.shape != ref.shape:
            raise AssertionError(f"ONNX output {out.shape} != PyTorch {ref.shape} at {h}x{w}")
        diffs.append(float(np.abs(out - ref).max()))
    return diffs


def onnx_metadata(parser: Parser) -> dict[str, str]:
    """The ``rimlab.*`` metadata of an exported parser: classes, colours, flip pairs, the
    validation input and the normalisation, as JSON strings."""
    return {
        "rimlab.class_names": json.dumps(parser.class_names),
        "rimlab.palette": json.dumps(parser.palette.tolist()),
        "rimlab.flip_pairs": json.dumps(parser.flip_pairs),
        "rimlab.eval_size": json.dumps(list(parser.eval_size) if parser.eval_size else None),
        # true: validation letterboxed its inputs into eval_size (aspect kept, black padding)
        "rimlab.eval_keep_ratio": json.dumps(bool(parser.keep_ratio)),
        "rimlab.mean": json.dumps(list(IMAGENET_MEAN)),
        "rimlab.std": json.dumps(list(IMAGENET_STD)),
        "rimlab.input": "image (B, 3, H, W) float32 RGB, (x / 255 - mean) / std",
        "rimlab.output": "logits (B, C, H, W) float32",
    }


def check_parity(
    net: nn.Module,
    path: Path,
    sizes: Sequence[Sequence[int]],
    tolerance: float,
    cuda_tolerance: float | None = None,
) -> dict[str, list[float]]:
    """onnxruntime against PyTorch at ``sizes`` on the CPU provider, and on the GPU provider
    when there is one: ``{"parity": [...], "parity_cuda": [...]}`` max |diff| per size.

    Args:
        tolerance: the CPU provider's bound.
        cuda_tolerance: the GPU provider's (None: ``tolerance``): its kernels (cuDNN's
            convolution algorithms) sum in other orders than PyTorch's CPU reference.

    Raises:
        PredictError: a difference above its provider's bound.
    """
    own = cuda_tolerance is not None
    bounds = {"parity": tolerance, "parity_cuda": cuda_tolerance if own else tolerance}
    names = {"parity": "tolerance", "parity_cuda": "cuda_tolerance" if own else "tolerance"}
    checks = {"parity": onnx_parity(net, path, sizes)}
    print(f"onnxruntime vs PyTorch max |diff| at {sizes}: {checks['parity']}")
    if cuda_provider_available():
        # The GPU provider picks other kernels (cuDNN, TF32 off by default in onnxruntime).
        checks["parity_cuda"] = onnx_parity(net, path, sizes, provider="CUDAExecutionProvider")
        print(f"onnxruntime CUDA vs PyTorch max |diff| at {sizes}: {checks['parity_cuda']}")
    for key, diffs in checks.items():
        if max(diffs) > bounds[key]:
            raise PredictError(
                f"{path}: onnxruntime and PyTorch logits differ by {max(diffs):.2e} ({key}) "
                f"> {names[key]}={bounds[key]:g}; the export is not trustworthy (try another "
                "opset)"
            )
    return checks


def export(cfg: DictConfig) -> dict[str, Any]:
    """The command on a composed ``conf/export.yaml``; returns ``{"output": path, "parity":
    [...]}`` (and ``parity_cuda`` with a GPU provider)."""
    args = options(cfg, ("ckpt", "output"))
    fmt = str(args["format"] or "onnx")
    if fmt != "onnx":
        raise PredictError(f"format={fmt}: only onnx is supported")
    ckpt = str(args["ckpt"])
    weights = str(args["weights"] or "auto")
    parser = load_parser(ckpt, "cpu", weights=weights, model=args["model"], data=args["data"])
    output = Path(str(args["output"]))
    if output.suffix != ".onnx":
        output = output / (Path(ckpt).stem + ".onnx")
    example = args["example_size"] or parser.eval_size or (64, 64)
    start = time.perf_counter()
    export_onnx(parser.net, output, example, int(args["opset"] or 18), onnx_metadata(parser))
    log.info("exported %s in %.1f s", output, time.perf_counter() - start)
    summary: dict[str, Any] = {"output": str(output)}
    if args["check"]:
        h, w = (int(v) for v in example)
        sizes = [(h, w), tuple(args["check_size"] or (h + 24, w + 40))]
        summary |= check_parity(
            parser.net,
            output,
            sizes,
            float(args["tolerance"] or 1e-4),
            float(args["cuda_tolerance"]) if args.get("cuda_tolerance") is not None else None,
        )
    print(f"wrote {output}")
    return summary


main = command("export", export)

if __name__ == "__main__":
    main()
