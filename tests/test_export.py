"""ONNX export: dynamic height/width and parity with PyTorch under onnxruntime (CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cfg_utils import SINGLE, TINY, compose_cfg
from torch import nn

from experiments.build import build_module
from experiments.export import MatrixAdaptiveAvgPool2d, main
from lightning_modules.parser import PredictError

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# float32 CPU kernels of two runtimes: summation orders differ, logits of O(1-10) agree to ~1e-5.
ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("size", [(7, 9), (16, 16), (33, 50), (1, 5)])
@pytest.mark.parametrize("bins", [1, 2, 3, 6])
def test_matrix_adaptive_pool_equals_torch(size, bins):
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    expected = nn.AdaptiveAvgPool2d(bins)(x)
    torch.testing.assert_close(MatrixAdaptiveAvgPool2d(bins)(x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("model", ["pspnet_lite", "ce2p_lite"])
def test_onnx_export_parity_two_sizes(model, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    cfg = compose_cfg(
        ["experiment=quickstart", *TINY, *SINGLE, "data.eval_size=[48,64]", f"model={model}"],
        tmp_path,
        tmp_path / "data",
    )
    torch.manual_seed(0)
    module = build_module(cfg)
    module.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        module(torch.randn(2, 3, 48, 64) * 2 + 0.5)
    module.eval()
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "m.ckpt")

    out = tmp_path / "export" / "m.onnx"
    summary = main(
        [f"ckpt={tmp_path / 'm.ckpt'}", "format=onnx", f"output={out}", "check_size=[75,41]"]
    )
    assert out.is_file()
    # The command's own parity check at the example size (48x64) and at 75x41.
    assert len(summary["parity"]) == 2 and max(summary["parity"]) < ATOL

    # An independent check at two further sizes, batch 2, against the module's forward.
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for h, w in [(40, 56), (97, 33)]:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            ref = module(x)["out"].numpy()
        got = session.run(["logits"], {"image": x.numpy()})[0]
        assert got.shape == (2, 59, h, w)
        np.testing.assert_allclose(got, ref, rtol=0, atol=ATOL)
        # Same class wherever PyTorch's top two logits are further apart than the tolerance.
        top2 = np.sort(ref, axis=1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 2 * ATOL
        np.testing.assert_array_equal(got.argmax(1)[clear], ref.argmax(1)[clear])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["rimlab.eval_size"]) == [48, 64]
    assert json.loads(meta["rimlab.eval_keep_ratio"]) is False
    assert len(json.loads(meta["rimlab.class_names"])) == 59


def test_parity_check_bounds_each_provider_by_its_own_tolerance(monkeypatch, tmp_path):
    """With a GPU provider the check runs twice; the CUDA difference is held to cuda_tolerance
    (cuDNN sums in other orders), the CPU one to tolerance, and the message names the bound."""
    from experiments import export as export_mod

    diffs = {"CPUExecutionProvider": [5e-5, 8e-5], "CUDAExecutionProvider": [4e-4, 6e-4]}
    calls = []

    def fake_parity(net, path, sizes, seed=0, provider="CPUExecutionProvider"):
        calls.append(provider)
        return diffs[provider]

    monkeypatch.setattr(export_mod, "onnx_parity", fake_parity)
    monkeypatch.setattr(export_mod, "cuda_provider_available", lambda: True)
    net, path, sizes = nn.Identity(), tmp_path / "m.onnx", [(8, 8), (9, 9)]
    got = export_mod.check_parity(net, path, sizes, 1e-4, 1e-3)
    assert got == {"parity": [5e-5, 8e-5], "parity_cuda": [4e-4, 6e-4]}
    assert calls == ["CPUExecutionProvider", "CUDAExecutionProvider"]
    with pytest.raises(PredictError, match=r"6\.00e-04 \(parity_cuda\) > tolerance=0\.0001"):
        export_mod.check_parity(net, path, sizes, 1e-4)  # no CUDA bound: the CPU one
    diffs["CUDAExecutionProvider"] = [2e-3, 1e-4]
    with pytest.raises(PredictError, match=r"2\.00e-03 \(parity_cuda\) > cuda_tolerance=0\.001"):
        export_mod.check_parity(net, path, sizes, 1e-4, 1e-3)
    diffs["CPUExecutionProvider"] = [2e-4, 0.0]
    with pytest.raises(PredictError, match=r"\(parity\) > tolerance=0\.0001"):
        export_mod.check_parity(net, path, sizes, 1e-4, 1e-3)
    monkeypatch.setattr(export_mod, "cuda_provider_available", lambda: False)
    diffs["CPUExecutionProvider"] = [5e-5, 8e-5]
    assert export_mod.check_parity(net, path, sizes, 1e-4, 1e-3) == {"parity": [5e-5, 8e-5]}
