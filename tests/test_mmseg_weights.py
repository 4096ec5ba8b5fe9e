"""mmsegmentation's Cityscapes checkpoints in rimlab: random weights in mmsegmentation's key layout
(``tests/mmseg_reference.py``, written from mmsegmentation's definitions) load into the
``*_mmseg`` model configs tensor by tensor and give the reference's logits; bad files are refused
by name; init_from / ckpt_path / predict take the files as they are.

The comparison with mmsegmentation's own code (not a rimlab dependency) is
``bench/mmseg_equivalence.py`` (docs/mmseg.md); ``test_equivalence_with_installed_mmseg`` runs it
when mmsegmentation is importable.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import hydra
import mmseg_reference as ref
import numpy as np
import pytest
import torch
from cfg_utils import CONF, ROOT, SINGLE, TINY, compose_cfg
from omegaconf import OmegaConf

from datamodules.batch import normalize_image
from lightning_modules.checkpoint_io import CheckpointError
from lightning_modules.inference import InferenceProtocol
from lightning_modules.mmseg_weights import (
    MMSegCheckpointError,
    load_mmseg_state,
    map_mmseg_state,
    mmseg_model_config,
    mmseg_state_dict,
    to_mmseg_state,
)
from lightning_modules.nets.backbones import parse_backbone

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIGS = {"psp": "pspnet", "aspp": "deeplabv3plus", "da": "danet"}
SIZE = (33, 65)  # odd sizes: every resize rounds


WIDTH = 32  # decode / auxiliary head width of the value tests (512 / 256 published: shapes only)
# the model configs' keys that set the head widths
WIDTH_KEYS = {
    "psp": ("ppm_channels", "bottleneck_channels"),
    "aspp": ("aspp_channels", "decoder_channels"),
    "da": ("inter_channels",),
}


def build(
    head: str,
    num_classes: int,
    depth: int = 50,
    meta: bool = False,
    config: str = "",
    width: int | None = None,
):
    """The net of conf/model/<net>_r<depth>_mmseg.yaml (or ``config``), heads ``width`` wide."""
    cfg = OmegaConf.load(CONF / "model" / f"{config or f'{CONFIGS[head]}_r{depth}_mmseg'}.yaml")
    cfg.num_classes = num_classes
    cfg.pretrained = False
    if width is not None:
        for key in (*WIDTH_KEYS[head], "aux_channels"):
            cfg[key] = width
    if meta:
        with torch.device("meta"):  # the module tree and shapes, without initialising weights
            return hydra.utils.instantiate(cfg)
    return hydra.utils.instantiate(cfg)


def small_state(head: str, num_classes: int, seed: int) -> dict[str, torch.Tensor]:
    """Random weights in mmseg's layout for R50 with ``WIDTH``-wide heads."""
    spec = ref.state_spec(head, 50, num_classes, channels=WIDTH, aux_channels=WIDTH)
    return ref.random_state(spec, seed)


def loaded(head: str, state: dict[str, torch.Tensor], num_classes: int):
    """A ``WIDTH``-wide net holding ``state`` (built on the meta device, the tensors assigned:
    no time spent initialising weights that are replaced)."""
    net = build(head, num_classes, meta=True, width=WIDTH)
    copies = {k: v.clone() for k, v in state.items()}  # assign: the net must not share storage
    net.load_state_dict(map_mmseg_state(copies, net, "random.pth"), strict=True, assign=True)
    return net


def meta_state(head: str, depth: int, num_classes: int) -> dict[str, torch.Tensor]:
    spec = ref.state_spec(head, depth, num_classes)
    return {k: torch.empty(shape, device="meta") for k, shape in spec.items()}


def save_mmseg(state: dict[str, torch.Tensor], path: Path) -> Path:
    """An mmsegmentation checkpoint as its runner writes it (0.x layout)."""
    meta = {"mmseg_version": "0.5.0", "CLASSES": [str(i) for i in range(19)], "iter": 40000}
    torch.save({"meta": meta, "state_dict": state}, path)
    return path


def _zero_dropout(net: torch.nn.Module) -> None:
    for m in net.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.p = 0.0


# ---------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("head", ref.HEADS)
def test_mmseg_weights_give_the_reference_logits(head):
    """Every head's logits equal the reference's (max abs diff < 1e-4, fp32): the main output in
    eval mode (running statistics), and every output in training mode (batch statistics, dropout
    off) as fine-tuning computes them."""
    num_classes = 5
    state = small_state(head, num_classes, seed=1)
    net = loaded(head, state, num_classes)
    x = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(2))
    net.eval()
    with torch.no_grad():
        ours = net(x)
        theirs = ref.forward(state, x, head)
    assert set(ours) == {"out"}
    assert theirs["out"].abs().max() > 0.1  # not two zero maps
    diff = (ours["out"] - theirs["out"]).abs().max().item()
    assert diff < 1e-4, f"eval: max abs diff {diff}"

    _zero_dropout(net)
    net.train()
    with torch.no_grad():
        ours = net(x)
        theirs = ref.forward(state, x, head, training=True)
    assert (
        set(ours)
        == set(theirs)
        == ({"out", "aux", "pam", "cam"} if head == "da" else {"out", "aux"})
    )
    for name in theirs:
        diff = (ours[name] - theirs[name]).abs().max().item()
        assert diff < 1e-4, f"train {name}: max abs diff {diff}"

    # Controls: the conversions matter, so the test would see them missing.
    if head == "aspp":
        # mmseg concatenates ASPP's image pool first: copied without the rotation, the
        # projection mixes the wrong branches.
        net.aspp.project[0].conv.weight.data.copy_(state["decode_head.bottleneck.conv.weight"])
    elif head == "da":
        net.pam.gamma.data.zero_()  # the attention contributes
    else:
        net.ppm.stages[0][1].conv.weight.data.copy_(
            state["decode_head.psp_modules.1.1.conv.weight"]
        )
    net.eval()
    with torch.no_grad():
        assert (net(x)["out"] - ref.forward(state, x, head)["out"]).abs().max() > 1e-3


@pytest.mark.parametrize("head", ref.HEADS)
def test_align_corners_models_give_the_reference_logits(head):
    """The ``*_mmseg_769`` configs (align_corners=True in every head resize, as mmseg's
    769x769 Cityscapes configs): every training-mode output equals the reference's with
    align_corners=True (< 1e-4) and differs from the align_corners=False one (control). Training
    mode: one forward gives every output; the resizes are the same in eval mode."""
    num_classes, size = 5, (17, 33)  # stride-8 features 3x5: every resize rounds
    state = small_state(head, num_classes, seed=11)
    net = build(head, num_classes, meta=True, width=WIDTH, config=f"{CONFIGS[head]}_r50_mmseg_769")
    assert net.align_corners is True
    net.load_state_dict(map_mmseg_state(dict(state), net, "x.pth"), strict=True, assign=True)
    _zero_dropout(net)
    net.train()
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        ours = net(x)
        theirs = ref.forward(state, x, head, training=True, align_corners=True)
        plain = ref.forward(state, x, head, training=True, align_corners=False)
    assert set(ours) == set(theirs)
    for name in theirs:
        diff = (ours[name] - theirs[name]).abs().max().item()
        assert diff < 1e-4, f"{name}: max abs diff {diff}"
        assert (ours[name] - plain[name]).abs().max() > 1e-3, f"{name}: align_corners unused"


def test_769_configs_are_their_base_with_align_corners():
    """Each ``<net>_r<depth>_mmseg_769`` is ``<net>_r<depth>_mmseg`` with align_corners true."""
    for net in CONFIGS.values():
        for depth in (50, 101):
            base = OmegaConf.load(CONF / "model" / f"{net}_r{depth}_mmseg.yaml")
            variant = OmegaConf.load(CONF / "model" / f"{net}_r{depth}_mmseg_769.yaml")
            assert base.align_corners is False and variant.align_corners is True
            base.align_corners = True
            assert variant == base, f"{net}_r{depth}_mmseg_769"


@pytest.mark.parametrize("depth", [50, 101])
@pytest.mark.parametrize("head", ref.HEADS)
def test_every_tensor_has_its_place(head, depth):
    """R50 and R101: every tensor of the mmseg spec maps to one of the net's and back (strict), with
    its shape; the inverse map restores mmseg's names and shapes exactly."""
    net = build(head, 19, depth, meta=True)
    state = meta_state(head, depth, 19)
    mapped = map_mmseg_state(state, net, "x.pth")
    assert set(mapped) == set(net.state_dict())
    assert len(mapped) == len(state)
    back = to_mmseg_state(net)
    assert {k: tuple(v.shape) for k, v in back.items()} == {
        k: tuple(v.shape) for k, v in state.items()
    }
    assert mmseg_model_config(state) == f"{CONFIGS[head]}_r{depth}_mmseg"


def test_inverse_map_round_trips_values():
    state = small_state("aspp", 3, seed=3)
    back = to_mmseg_state(loaded("aspp", state, 3))
    for key, value in state.items():
        assert torch.equal(back[key], value), key


def test_v1c_backbone_names_and_stem():
    assert parse_backbone("resnet50_v1c") == (50, "deep")
    assert parse_backbone("r101-v1c") == (101, "deep")
    assert parse_backbone(50) == (50, "torchvision")
    with pytest.raises(ValueError, match="resnet50_v1c or resnet101_v1c"):
        parse_backbone("resnet18_v1c")
    net = build("psp", 3, meta=True)
    stem = net.backbone.stem
    assert [tuple(stem[i].weight.shape) for i in (0, 3, 6)] == [
        (32, 3, 3, 3),
        (32, 32, 3, 3),
        (64, 32, 3, 3),
    ]
    assert stem[0].stride == (2, 2) and stem[3].stride == (1, 1)
    # contract_dilation: the first block of layer3/layer4 keeps the previous dilation
    layer3, layer4 = net.backbone.layer3, net.backbone.layer4
    assert (layer3[0].conv2.dilation, layer3[1].conv2.dilation) == ((1, 1), (2, 2))
    assert (layer4[0].conv2.dilation, layer4[1].conv2.dilation) == ((2, 2), (4, 4))
    assert net.backbone.layer2[0].conv2.stride == (2, 2)


def test_v1c_imagenet_weights_load_from_the_hub_cache(tmp_path, monkeypatch):
    """pretrained=true with the deep stem reads mmcv's resnet50_v1c file from the hub cache (its
    names are the backbone's; the classifier is dropped), or names the file and URL."""
    from lightning_modules.nets.backbones import DilatedResNet, v1c_checkpoint_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"resnet50_v1c-2cccc1ad\.pth.*openmmlab"):
        DilatedResNet(50, pretrained=True, stem="deep")
    state = small_state("psp", 3, seed=4)
    backbone = {k.removeprefix("backbone."): v for k, v in state.items() if "backbone." in k}
    backbone |= {"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}
    Path(v1c_checkpoint_path(50)).parent.mkdir(parents=True)
    torch.save({"state_dict": backbone}, v1c_checkpoint_path(50))
    net = DilatedResNet(50, pretrained=True, stem="deep")
    assert torch.equal(net.stem[6].weight, backbone["stem.6.weight"])
    assert torch.equal(net.layer4[2].bn3.running_var, backbone["layer4.2.bn3.running_var"])


# ---------------------------------------------------------------------- detection and refusals


def test_detection_of_the_layout(tmp_path):
    state = meta_state("psp", 50, 19)
    assert mmseg_state_dict({"meta": {}, "state_dict": state}) is not None
    assert mmseg_state_dict({"state_dict": {"net.classifier.weight": torch.zeros(1)}}) is None
    assert mmseg_state_dict(state) is None  # a bare state dict is not mmseg's file
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {"net.x": torch.zeros(1)}}, path)
    with pytest.raises(MMSegCheckpointError, match="not an mmsegmentation checkpoint"):
        load_mmseg_state(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            "drop",
            r"tensor 'decode_head\.bottleneck\.bn\.running_var' is missing .*"
            r"rimlab's 'bottleneck\.bn\.running_var'",
        ),
        ("extra", r"unexpected tensor 'decode_head\.extra\.weight' \(3,\)"),
        (
            "classes",
            r"'decode_head\.conv_seg\.weight' has shape \(19, 512, 1, 1\).*"
            r"\(5, 512, 1, 1\).*19 classes",
        ),
        ("other_head", r"unexpected tensor 'decode_head\.psp_modules.*use model=pspnet_r50_mmseg"),
        ("torchvision", r"unexpected tensor 'backbone\.stem\.0\.weight'.*model=pspnet_r50_mmseg"),
        ("plain_deeplab", r"'decoder\.0\.conv\.weight' has no mmsegmentation counterpart"),
    ],
)
def test_bad_checkpoints_are_refused_by_name(edit, message):
    state = meta_state("psp", 50, 19)
    head, config = "psp", ""
    if edit == "drop":
        del state["decode_head.bottleneck.bn.running_var"]
    elif edit == "extra":
        state["decode_head.extra.weight"] = torch.empty(3, device="meta")
    elif edit == "other_head":
        head = "da"
    elif edit == "torchvision":
        config = "pspnet_r50"
    elif edit == "plain_deeplab":
        head, config = "aspp", "deeplabv3plus_r50"
    net = build(head, 5 if edit == "classes" else 19, meta=True, config=config)
    with pytest.raises(MMSegCheckpointError, match=message) as err:
        map_mmseg_state(state, net, "/data/pspnet_cityscapes.pth")
    assert "/data/pspnet_cityscapes.pth" in str(err.value)
    assert isinstance(err.value, CheckpointError)


def test_missing_batch_counters_are_filled():
    state = meta_state("psp", 50, 19)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    net = build("psp", 19, meta=True)
    mapped = map_mmseg_state(state, net, "x.pth")
    assert set(mapped) == set(net.state_dict())


# ---------------------------------------------------------------------- the commands


def test_init_from_and_ckpt_path_read_an_mmseg_checkpoint(tmp_path):
    """ParsingLitModule.load_init_weights (init_from=, and ckpt_path= with train=false) detects the
    layout and loads every tensor into the net."""
    from lightning_modules.parsing import ParsingLitModule
    from losses import CrossEntropyLoss, ParsingLoss

    state = small_state("da", 19, seed=5)
    path = save_mmseg(state, tmp_path / "danet_r50-d8_512x1024_40k_cityscapes.pth")
    module = ParsingLitModule(
        net=build("da", 19, width=WIDTH),
        loss=ParsingLoss(main=CrossEntropyLoss()),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.01),
        num_classes=19,
    )
    module.load_init_weights(str(path))
    net = module.net
    assert torch.equal(net.cam.gamma, state["decode_head.cam.gamma.scale"].reshape(1))
    assert torch.equal(net.pam_head.classifier.bias, state["decode_head.pam_conv_seg.bias"])
    assert torch.equal(net.backbone.stem[4].running_mean, state["backbone.stem.4.running_mean"])
    assert torch.equal(net.aux_head.conv.conv.weight, state["auxiliary_head.convs.0.conv.weight"])


def test_predict_runs_an_mmseg_checkpoint(tmp_path):
    """experiments.predict takes the file as it is: pspnet_r50_mmseg from its decode head and depth,
    data=cityscapes from its 19 classes, ids equal to the reference's arg-max at the image size."""
    from experiments import predict
    from lightning_modules.inference import scores_to_original

    state = ref.random_state(ref.state_spec("psp", 50, 19), seed=6)
    path = save_mmseg(state, tmp_path / "pspnet_r50-d8_512x1024_40k_cityscapes.pth")
    parser = predict.load_parser(path, "cpu", size=SIZE)
    assert parser.num_classes == 19 and parser.class_names[18] == "bicycle"
    rgb = np.random.default_rng(1).integers(0, 256, (40, 72, 3), dtype=np.uint8)
    ids, _ = parser.predict(rgb)
    x, box = parser.prepare(rgb)
    with torch.no_grad():
        logits = ref.forward(state, x, "psp")["out"]
    expected = scores_to_original(logits, (40, 72), box, SIZE)[0].argmax(0).numpy()
    assert ids.shape == (40, 72)
    assert (ids == expected).mean() > 0.999
    with pytest.raises(MMSegCheckpointError, match="use model=pspnet_r50_mmseg"):
        predict.load_parser(path, "cpu", size=SIZE, model="danet_r50_mmseg", data="cityscapes")


# ---------------------------------------------------------------------- mmseg's 769x769 test


class _WindowNet(torch.nn.Module):
    """A net whose window logits depend on the window's borders: a zero-padded 3x3 conv at half
    resolution, resized to the window (so window placement and averaging are visible)."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.conv(torch.nn.functional.avg_pool2d(x, 2, ceil_mode=True))
        return torch.nn.functional.interpolate(
            low, size=x.shape[-2:], mode="bilinear", align_corners=True
        )


def test_slide_windows_of_mmsegs_769_test():
    """mmseg's 769x769 test slides 2 x 4 windows over the 1025x2049 input: rows at 0 and
    1025 - 769 = 256, columns every 513 with the last moved back to 2049 - 769 = 1280."""
    from lightning_modules.inference import window_boxes

    rows, cols = [(0, 769), (256, 1025)], [(0, 769), (513, 1282), (1026, 1795), (1280, 2049)]
    expected = [(y1, y2, x1, x2) for y1, y2 in rows for x1, x2 in cols]
    assert window_boxes(1025, 2049, (769, 769), (513, 513)) == expected


@pytest.mark.parametrize("shape", [(11, 17), (4, 17)])
def test_slide_inference_is_mmsegs(shape):
    """``eval=mmseg_slide_769`` (``pad_to_crop: false``) slides as mmseg's ``slide_inference``
    (``tests/mmseg_reference.slide``): overlapping windows, the last ones moved back, count_mat;
    an image lower than the crop (4 < 5) gets shorter windows, no padding (padding changes the
    logits: control)."""
    from lightning_modules.parser import eval_protocol

    net, crop, stride = _WindowNet(), (5, 7), (3, 4)
    x = torch.randn(1, 3, *shape, generator=torch.Generator().manual_seed(3))
    protocol = eval_protocol(
        {"data": {"num_classes": 3}},
        "mmseg_slide_769",
        {"crop_size": list(crop), "stride": list(stride)},
    )
    assert protocol.mode == "slide" and protocol.pad_to_crop is False
    with torch.no_grad():
        expected = ref.slide(net, x, crop, stride, 3)
        ours = protocol(net, x, align_corners=True)
        padded = InferenceProtocol(mode="slide", crop_size=crop, stride=stride)(net, x)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    if shape[0] < crop[0]:
        assert (padded - expected).abs().max() > 1e-3
    else:
        torch.testing.assert_close(padded, expected, rtol=0, atol=1e-6)


def test_evaluation_resizes_with_the_nets_align_corners():
    """Validation and predict score a ``*_mmseg_769`` net as mmseg's 769x769 test: the image
    resized to the input, the slide's logits brought back to the image's size with
    align_corners=True, the net's; a plain ``*_mmseg`` net's with False."""
    from lightning_modules.parser import Parser
    from lightning_modules.parsing import ParsingLitModule

    # the image 33x49 resized to the input 17x25 and the scores back: mmseg resizes 1024x2048 to
    # 1025x2049, whose tiny shift rarely moves an arg-max of random weights; this one does
    num_classes, size, orig = 5, (17, 25), (33, 49)
    crop, stride = (9, 13), (8, 12)  # 2 x 2 overlapping windows
    state = small_state("psp", num_classes, seed=13)
    rgb = np.random.default_rng(14).integers(0, 256, (*orig, 3), dtype=np.uint8)
    protocol = InferenceProtocol(mode="slide", crop_size=crop, stride=stride, pad_to_crop=False)
    # Random weights give one class nearly everywhere: tie the two leading classes on average so
    # that class boundaries cross the image and the resize decides pixels near them.
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    with torch.no_grad():
        mean = ref.forward(state, normalize_image(x), "psp")["out"].mean((0, 2, 3))
    first, second = mean.topk(2).indices.tolist()
    state["decode_head.conv_seg.bias"][second] += mean[first] - mean[second]
    for config, align in (("pspnet_r50_mmseg_769", True), ("pspnet_r50_mmseg", False)):
        net = build("psp", num_classes, meta=True, width=WIDTH, config=config)
        net.load_state_dict(map_mmseg_state(dict(state), net, "x.pth"), strict=True, assign=True)
        net.eval()
        palette = np.zeros((num_classes, 3), np.uint8)
        parser = Parser(
            net, num_classes, list("abcde"), palette, eval_size=size, inference=protocol
        )
        x, _ = parser.prepare(rgb)
        module = ParsingLitModule(
            net=net,
            loss=torch.nn.Module(),
            optimizer=lambda params: None,
            num_classes=num_classes,
            inference=protocol,
        ).eval()
        written: dict[str, np.ndarray] = {}
        module.prediction_writer = lambda stage, name, ids, out=written: out.__setitem__(name, ids)
        batch = {
            "image": x,
            "mask": torch.zeros(1, *orig, dtype=torch.int64),
            "orig_size": torch.tensor([orig]),
            "name": ["a"],
        }
        with torch.no_grad():
            module._eval_step(batch, module.val_confmat, "val")
            ids, _ = parser.predict(rgb)
            chunked, _ = parser.predict(rgb, with_scores=False)

            def reference(w, align=align):
                return ref.forward(state, w, "psp", align_corners=align)["out"]

            logits = ref.slide(reference, x, crop, stride, num_classes)
        expected = {
            a: torch.nn.functional.interpolate(
                logits, size=orig, mode="bilinear", align_corners=a
            ).argmax(1)[0]
            for a in (True, False)
        }
        assert not torch.equal(expected[True], expected[False])  # the switch shows in the ids
        for name, got in (("validation", written["a"]), ("predict", ids), ("labels", chunked)):
            np.testing.assert_array_equal(got, expected[align].numpy(), err_msg=name)


def test_eval_record_and_checkpoint_config_carry_align_corners(tmp_path):
    """results.json's protocol says align_corners for a _769 net (absent for the others, whose
    records stay as they were), and the checkpoint's build config rebuilds it with the switch."""
    from experiments.keys import inference_config
    from experiments.results import eval_protocol

    cfg = compose_cfg(["model=pspnet_r50_mmseg_769", "eval=mmseg_slide_769"], tmp_path)
    protocol = eval_protocol(cfg)
    assert protocol["align_corners"] is True
    assert protocol["pad_to_crop"] is False and protocol["input"]["eval_size"] == [1025, 2049]
    assert inference_config(cfg)["model"]["align_corners"] is True
    assert "align_corners" not in eval_protocol(compose_cfg(["model=pspnet_r50_mmseg"], tmp_path))


def test_resuming_training_from_an_mmseg_checkpoint_is_refused(tmp_path):
    from datamodules.errors import ConfigError
    from experiments.checkpoints import refuse_weights_only_resume

    path = save_mmseg(small_state("psp", 3, seed=8), tmp_path / "psp.pth")
    with pytest.raises(ConfigError, match=rf"mmsegmentation checkpoint.*init_from={path}"):
        refuse_weights_only_resume(str(path))
    lightning = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"net.x": torch.zeros(1)}, "epoch": 3}, lightning)
    refuse_weights_only_resume(str(lightning))  # a Lightning checkpoint resumes


@pytest.mark.slow
def test_fine_tune_and_evaluate_an_mmseg_checkpoint(tmp_path):
    """run.py's paths end to end on the synthetic set (59 classes): init_from=<mmseg file> trains
    from it, train=false ckpt_path=<mmseg file> scores it."""
    from run import run

    path = save_mmseg(small_state("aspp", 59, seed=7), tmp_path / "deeplabv3plus.pth")
    base = [
        *TINY,
        *SINGLE,
        "model=deeplabv3plus_r50_mmseg",
        "model.pretrained=false",
        *(f"model.{key}={WIDTH}" for key in (*WIDTH_KEYS["aspp"], "aux_channels")),
        "data.synthetic.num_train=4",
        "data.synthetic.num_val=2",
        "data.synthetic.image_size=[48,48]",
        "data.synthetic.size_jitter=0",
        "data.crop_size=[40,40]",
        "data.base_size=48",
        "data.batch_size=2",
        "schedule.total_epochs=1",
    ]
    results = run(compose_cfg([*base, f"init_from={path}"], tmp_path / "a"))
    assert np.isfinite(results["val"]["mIoU"])
    results = run(compose_cfg([*base, "train=false", f"ckpt_path={path}"], tmp_path / "b"))
    assert results["evaluated"]["checkpoint"] == str(path)
    assert np.isfinite(results["val"]["mIoU"])


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("mmseg") is None, reason="mmsegmentation is not installed"
)
def test_equivalence_with_installed_mmseg(tmp_path):
    """bench/mmseg_equivalence.py against the installed mmsegmentation (docs/mmseg.md): the
    512x1024 configs, and PSPNet's 769x769 test in the shrunk geometry."""
    bench = [sys.executable, str(ROOT / "bench" / "mmseg_equivalence.py")]
    for args in (
        ["--size", "64", "128"],
        ["--config", "769x769", "--shrink", "8", "--size", "128", "256", "--nets", "pspnet"],
    ):
        json_path = tmp_path / f"eq{len(args)}.json"
        out = subprocess.run(
            [*bench, *args, "--json", str(json_path)], capture_output=True, text=True, cwd=ROOT
        )
        assert out.returncode == 0, out.stdout + out.stderr
