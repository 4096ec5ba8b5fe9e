"""Published SCHP weights in rimlab: the official network, written here from its definition
(``networks/AugmentCE2P.py``), saved in the official checkpoint layout and loaded through
rimlab, must give the same logits; bad checkpoints are refused by name."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.nets.schp_official import SCHPCE2P
from lightning_modules.official_weights import (
    OfficialCheckpointError,
    load_official_state,
    map_official_state,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = (1, 1, 2, 2)  # blocks per stage: layer3 and layer4 keep a non-first block


# ---------------------------------------------------------------------- the official network


class ABN(nn.Module):
    """InPlace-ABN's function: BatchNorm with scale ``|weight| + eps``, then LeakyReLU(0.01)
    (``activation=None``: none, the backbone's ``BatchNorm2d`` partial)."""

    def __init__(self, channels: int, activation: str | None = "leaky_relu") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight.abs() + 1e-5
        x = F.batch_norm(x, self.running_mean, self.running_var, scale, self.bias, False, 0, 1e-5)
        return F.leaky_relu(x, 0.01) if self.activation else x


def conv_abn(cin: int, cout: int, k: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), ABN(cout)]


class OfficialBottleneck(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int, dilation: int, down: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = ABN(planes, None)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, dilation, dilation, bias=False)
        self.bn2 = ABN(planes, None)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = ABN(planes * 4, None)
        self.downsample = down

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class OfficialSCHP(nn.Module):
    """``AugmentCE2P.ResNet``: deep stem, layer4 with dilation 2 everywhere, PSP, edge, decoder
    and fusion heads, align_corners=True resizes; returns ``[[parsing, fusion], [edge]]``."""

    def __init__(self, num_classes: int, layers=(3, 4, 23, 3)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 2, 1, bias=False)
        self.bn1 = ABN(64, None)
        self.conv2 = nn.Conv2d(64, 64, 3, 1, 1, bias=False)
        self.bn2 = ABN(64, None)
        self.conv3 = nn.Conv2d(64, 128, 3, 1, 1, bias=False)
        self.bn3 = ABN(128, None)
        self.inplanes = 128
        self.layer1 = self._layer(64, layers[0], 1, 1)
        self.layer2 = self._layer(128, layers[1], 2, 1)
        self.layer3 = self._layer(256, layers[2], 2, 1)
        self.layer4 = self._layer(512, layers[3], 1, 2)
        self.context_encoding = nn.Module()
        self.context_encoding.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), nn.Conv2d(2048, 512, 1, bias=False), ABN(512))
            for s in (1, 2, 3, 6)
        )
        self.context_encoding.bottleneck = nn.Sequential(*conv_abn(2048 + 4 * 512, 512, 3))
        self.edge = nn.Module()
        for i, c in enumerate((256, 512, 1024), 1):
            setattr(self.edge, f"conv{i}", nn.Sequential(*conv_abn(c, 256)))
        self.edge.conv4 = nn.Conv2d(256, 2, 3, padding=1)
        self.edge.conv5 = nn.Conv2d(6, 2, 1)
        self.decoder = nn.Module()
        self.decoder.conv1 = nn.Sequential(*conv_abn(512, 256))
        self.decoder.conv2 = nn.Sequential(*conv_abn(256, 48))
        self.decoder.conv3 = nn.Sequential(*conv_abn(304, 256), *conv_abn(256, 256))
        self.decoder.conv4 = nn.Conv2d(256, num_classes, 1)
        self.fushion = nn.Sequential(
            *conv_abn(1024, 256), nn.Dropout2d(0.1), nn.Conv2d(256, num_classes, 1)
        )

    def _layer(self, planes: int, blocks: int, stride: int, dilation: int) -> nn.Sequential:
        down = None
        if stride != 1 or self.inplanes != planes * 4:
            down = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False), ABN(planes * 4, None)
            )
        out = [OfficialBottleneck(self.inplanes, planes, stride, dilation, down)]
        self.inplanes = planes * 4
        out += [
            OfficialBottleneck(self.inplanes, planes, 1, dilation, None) for _ in range(1, blocks)
        ]
        return nn.Sequential(*out)

    def forward(self, x: Tensor) -> list[list[Tensor]]:
        def up(t: Tensor, size) -> Tensor:
            return F.interpolate(t, size=size, mode="bilinear", align_corners=True)

        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        x2 = self.layer1(F.max_pool2d(x, 3, 2, 1))
        x3 = self.layer2(x2)
        x4 = self.layer3(x3)
        x5 = self.layer4(x4)
        ctx = self.context_encoding
        priors = [up(s(x5), x5.shape[-2:]) for s in ctx.stages] + [x5]
        context = ctx.bottleneck(torch.cat(priors, 1))
        dec = self.decoder
        xt = up(dec.conv1(context), x2.shape[-2:])
        parsing_fea = dec.conv3(torch.cat([xt, dec.conv2(x2)], 1))
        parsing = dec.conv4(parsing_fea)
        feas = [self.edge.conv1(x2), self.edge.conv2(x3), self.edge.conv3(x4)]
        edges = [up(self.edge.conv4(f), x2.shape[-2:]) for f in feas]
        edge = self.edge.conv5(torch.cat(edges, 1))
        edge_fea = torch.cat([up(f, x2.shape[-2:]) for f in feas], 1)
        fusion = self.fushion(torch.cat([parsing_fea, edge_fea], 1))
        return [[parsing, fusion], [edge]]


def _randomise(net: nn.Module, seed: int = 0) -> None:
    """Random weights and statistics; negative ABN weights exercise the |gamma| + eps rule."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (1.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, ABN):
                c = m.weight.numel()
                m.weight.copy_(torch.rand(c, generator=g) * 1.6 - 0.4)  # some negative
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)


def _save_official(net: nn.Module, path: Path) -> Path:
    """The official layout: DataParallel's ``module.`` prefixes under ``state_dict``."""
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    return path


def _official_input(bgr: np.ndarray, size: int) -> np.ndarray:
    """SCHP's evaluation warp with rotation 0, from its definition: the box (0, 0, W-1, H-1)
    centred on the output, its longer side scaled onto ``size - 1`` pixels, bilinear, black."""
    h, w = bgr.shape[:2]
    centre = np.array([(w - 1) / 2, (h - 1) / 2])
    k = (size - 1) / max(w - 1, h - 1)
    shift = (size - 1) / 2 - k * centre
    m = np.array([[k, 0, shift[0]], [0, k, shift[1]]], dtype=np.float64)
    return cv2.warpAffine(bgr, m, (size, size), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))


def _normalise(image: np.ndarray, mean, std) -> Tensor:
    """``(H, W, 3)`` uint8 -> ``(1, 3, H, W)``: ToTensor then Normalize, channels as given."""
    x = torch.from_numpy(image.astype(np.float32) / 255).permute(2, 0, 1)
    return ((x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1))[None]


# ---------------------------------------------------------------------- equivalence


def test_official_checkpoint_gives_the_official_logits(tmp_path):
    """Random official weights -> official .pth -> rimlab's SCHPCE2P: the same fusion, parsing
    and edge logits (max abs diff < 1e-4, fp32) on a 50 x 80 BGR photo warped to 65 x 65, the
    official net fed BGR with SCHP's BGR statistics, rimlab's RGB with ImageNet's."""
    torch.manual_seed(0)
    official = OfficialSCHP(20, SMALL).eval()
    _randomise(official)
    path = _save_official(official, tmp_path / "exp-schp-lip.pth")
    net = SCHPCE2P(20, layers=SMALL).eval()
    net.load_state_dict(map_official_state(load_official_state(path), net, path))

    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, (50, 80, 3), dtype=np.uint8)
    warped = _official_input(bgr, 65)
    x_official = _normalise(warped, (0.406, 0.456, 0.485), (0.225, 0.224, 0.229))
    x_rimlab = _normalise(warped[..., ::-1].copy(), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    with torch.no_grad():
        (parsing, fusion), (edge,) = official(x_official)
        ours = net(x_rimlab, side_outputs=True)

    def up(t: Tensor) -> Tensor:  # evaluate.py's interp to the input size
        return F.interpolate(t, size=(65, 65), mode="bilinear", align_corners=True)

    assert fusion.abs().max() > 0.1  # the comparison is not between two zero maps
    for name, theirs in (("out", fusion), ("parsing", parsing), ("edge", edge)):
        diff = (ours[name] - up(theirs)).abs().max().item()
        assert diff < 1e-4, f"{name}: max abs diff {diff}"
    # Control: copying InPlace-ABN's gamma as BatchNorm's weight (without |gamma| + eps) is
    # another function, so the test would see a wrong mapping.
    raw = SCHPCE2P(20, layers=SMALL).eval()
    mapped = map_official_state(load_official_state(path), raw, path)
    state = {k[7:]: v for k, v in torch.load(path, weights_only=True)["state_dict"].items()}
    mapped["backbone.bn1.weight"] = state["bn1.weight"]
    raw.load_state_dict(mapped)
    with torch.no_grad():
        assert (raw(x_rimlab)["out"] - up(fusion)).abs().max() > 1e-3


def test_full_depth_official_state_maps_onto_every_tensor(tmp_path):
    """ResNet-101 depth (3, 4, 23, 3), 18 classes: every official tensor has its place and every
    rimlab tensor a source (strict load), with a plain (unwrapped) state dict."""
    official = OfficialSCHP(18)
    net = SCHPCE2P(18)
    state = {k: v for k, v in official.state_dict().items()}
    mapped = map_official_state(state, net, "atr.pth")
    net.load_state_dict(mapped, strict=True)
    assert len(state) == len([k for k in mapped if not k.endswith("num_batches_tracked")])
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in official.parameters())


# ---------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("drop", r"tensor 'layer3\.1\.bn2\.weight' is missing"),
        ("extra", r"unexpected tensor 'extra\.weight'"),
        ("classes", r"'(decoder\.conv4|fushion\.3)\.weight' has shape \(18, 256, 1, 1\).*data=atr"),
    ],
)
def test_bad_official_checkpoints_are_refused_by_name(tmp_path, edit, message):
    official = OfficialSCHP(18 if edit == "classes" else 20, SMALL)
    state = dict(official.state_dict())
    if edit == "drop":
        del state["layer3.1.bn2.weight"]
    elif edit == "extra":
        state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "bad.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)  # a bare state dict
    with pytest.raises(OfficialCheckpointError, match=message) as err:
        net = SCHPCE2P(20, layers=SMALL)
        map_official_state(load_official_state(path), net, path)
    assert str(path) in str(err.value)


def test_init_from_detects_an_official_checkpoint(tmp_path):
    """ParsingLitModule.load_init_weights (init_from=, ckpt_path= with train=false) reads the
    official layout into ``net``; a SCHP module has no average afterwards."""
    from lightning_modules.schp import SCHPLitModule
    from losses.ce2p import CE2PLoss

    official = OfficialSCHP(20, SMALL)
    _randomise(official, seed=1)
    path = _save_official(official, tmp_path / "lip.pth")
    module = SCHPLitModule(
        net=SCHPCE2P(20, layers=SMALL),
        loss=CE2PLoss(),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        num_classes=20,
    )
    module.load_init_weights(str(path))
    expected = official.layer4[1].bn2.weight.abs() + 1e-5
    torch.testing.assert_close(module.net.backbone.layer4[1].bn2.weight, expected)
    torch.testing.assert_close(module.net.fusion[4].weight, official.fushion[3].weight)
    assert not module.has_average


# ---------------------------------------------------------------------- predict and export


@pytest.mark.slow
def test_predict_and_export_run_an_official_checkpoint(tmp_path):
    """experiments.predict and experiments.export take an official .pth as it is: data=lip from
    its 20 classes, ids of the full-depth net equal to the official net's arg-max on the same
    input (rimlab's 65 x 65 letterbox, converted to SCHP's BGR convention); the export, of a
    one-block-per-stage file of the official layout (``model=ce2p_r101_schp
    model.layers=[1,1,1,1]``: the export traces the same modules at a third of the time), with
    ONNX parity < 1e-4."""
    from experiments import export, predict

    torch.manual_seed(0)
    official = OfficialSCHP(20).eval()
    _randomise(official, seed=2)
    path = _save_official(official, tmp_path / "exp-schp-201908261155-lip.pth")
    parser = predict.load_parser(path, "cpu", size=(65, 65), keep_ratio=True)
    assert parser.num_classes == 20 and parser.class_names[19] == "Right-shoe"
    assert parser.flip_pairs == [[14, 15], [16, 17], [18, 19]]
    rgb = np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    ids, _ = parser.predict(rgb)
    x, box = parser.prepare(rgb)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    raw_bgr = (x * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1))[:, [2, 1, 0]]
    x_official = (raw_bgr - torch.tensor([0.406, 0.456, 0.485]).view(1, 3, 1, 1)) / torch.tensor(
        [0.225, 0.224, 0.229]
    ).view(1, 3, 1, 1)
    with torch.no_grad():
        fusion = official(x_official)[0][1]
    fusion = F.interpolate(fusion, size=(65, 65), mode="bilinear", align_corners=True)
    from lightning_modules.inference import scores_to_original

    expected = scores_to_original(fusion, (40, 56), box, (65, 65))[0].argmax(0).numpy()
    assert (ids == expected).mean() > 0.999

    shallow = OfficialSCHP(20, layers=(1, 1, 1, 1)).eval()
    _randomise(shallow, seed=3)
    shallow_path = _save_official(shallow, tmp_path / "exp-schp-shallow-lip.pth")
    summary = export.main(
        [
            f"ckpt={shallow_path}",
            f"output={tmp_path / 'schp.onnx'}",
            "example_size=[65,65]",
            "check_size=[81,97]",
            "model=ce2p_r101_schp",
            "model.layers=[1,1,1,1]",
        ]
    )
    assert max(summary["parity"]) < 1e-4
