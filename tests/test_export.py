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
