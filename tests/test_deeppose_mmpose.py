"""mmpose's DeepPose onto rimlab: random weights in mmpose's key layout, run by a reference network
written from mmpose's published definition (ResNet -> GlobalAveragePooling -> RegressionHead,
output r = pixel / S, flip test ``1 - r - 1 / S``), give the coordinates rimlab computes; the flip
averaging against a hand derivation; refusals; the smooth L1 loss and the schedule by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cfg_utils import compose_cfg
from torch import nn

from datamodules.pose_transforms import MPII_FLIP_PAIRS, flip_permutation, invert_affine
from lightning_modules.checkpoint_io import CheckpointError
from lightning_modules.nets.deeppose import DeepPoseAlexNet, DeepPoseResNet
from lightning_modules.pose import PoseRegressionLitModule
from losses.pose import JointL2Loss, JointSmoothL1Loss

S = 32  # crop side of these tests (mmpose's head pools globally: any size works; 1x1 at layer4)

# -- a reference written from mmpose's definition -------------------------------------------------


class _Bottleneck(nn.Module):
    """mmpose ResNet's Bottleneck, style 'pytorch' (stride on the 3x3 conv), expansion 4."""

    def __init__(self, cin: int, mid: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, mid * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid * 4)
        self.downsample = None
        if stride != 1 or cin != mid * 4:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, mid * 4, 1, stride, bias=False), nn.BatchNorm2d(mid * 4)
            )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class _MMPoseResNet50(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (blocks, mid) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True)):
            layer = []
            for b in range(blocks):
                layer.append(_Bottleneck(cin, mid, 2 if b == 0 and i > 0 else 1))
                cin = mid * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class _MMPoseDeepPose(nn.Module):
    """TopdownPoseEstimator(ResNet-50, GlobalAveragePooling, RegressionHead(2048, K))."""

    def __init__(self, k: int = 16) -> None:
        super().__init__()
        self.backbone = _MMPoseResNet50()
        self.head = nn.Module()
        self.head.fc = nn.Linear(2048, 2 * k)

    def forward(self, x):  # (N, K, 2) in [0, 1] of the input (RegressionLabel)
        feat = self.backbone(x).mean((2, 3))
        return self.head.fc(feat).reshape(x.shape[0], -1, 2)

    def predict(self, x, shift: bool = True):
        """mmpose's flip test: inputs.flip(-1), flip_coordinates, mean of the two."""
        r = self(x)
        f = self(x.flip(-1)).clone()
        f[..., 0] = 1.0 - f[..., 0]
        if shift:
            f[..., 0] -= 1.0 / x.shape[-1]
        f = f[:, flip_permutation(16, MPII_FLIP_PAIRS)]
        return 0.5 * (r + f)


@pytest.fixture(scope="module")
def mmpose_file(tmp_path_factory):
    """A reference net with random weights (BN statistics included) saved as mmpose 0.x saves it."""
    torch.manual_seed(0)
    ref = _MMPoseDeepPose()
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.3, 1.0)
                m.bias.uniform_(-0.1, 0.1)
        ref.head.fc.weight.mul_(20.0)  # outputs that move with the image
        ref.head.fc.bias.fill_(0.5)
    state = {k.replace("head.fc", "keypoint_head.fc"): v for k, v in ref.state_dict().items()}
    path = tmp_path_factory.mktemp("mmpose") / "deeppose_res50_mpii_256x256.pth"
    torch.save({"meta": {"mmpose_version": "0.12.0"}, "state_dict": state}, path)
    return path, ref.eval(), state


def _module(net: nn.Module, **kw) -> PoseRegressionLitModule:
    return PoseRegressionLitModule(net, JointL2Loss(), torch.optim.SGD, **kw)


def test_cascade_evaluates_mmpose_weights_as_the_reference_does(mmpose_file, tmp_path):
    """train=false ckpt_path=<mmpose .pth> with flip test: rimlab's val predictions (image pixels)
    equal the reference's r * S on the same crops, un-cropped through the crop's pixel map."""
    from datamodules.mpii import MPIIDataset
    from datamodules.pose_transforms import PersonCrop, pixel_affine
    from experiments.ranks import LAUNCH_ENV
    from run import run

    path, ref, _ = mmpose_file
    over = [
        "experiment=deeppose_r50_mpii",
        "data=synthetic_mpii",
        "trainer=cpu",
        "data.synthetic.num_train=4",
        "data.synthetic.num_val=3",
        "data.synthetic.image_size=72",
        "data.num_workers=0",
        f"data.input_size={S}",
        f"model.input_size={S}",
        "train=false",
        f"ckpt_path={path}",
        "logger=csv",
        "~callbacks.rich_progress_bar",
        "~callbacks.model_summary",
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(LAUNCH_ENV, "unset")
        results = run(compose_cfg(over, tmp_path))
    assert results["stages"]["stage1"]["init_from"] == str(path)
    got = np.load(tmp_path / "run" / "stage1" / "val_predictions.npy")
    val = MPIIDataset(tmp_path / "data" / "synthetic_mpii", "val", transform=PersonCrop(S))
    items = [val[i] for i in range(len(val))]
    with torch.no_grad():
        r = ref.predict(torch.stack([it["image"] for it in items]).float()).double().numpy()
    for i, item in enumerate(items):
        u = r[i] * S  # (K, 2) the joints' pixels in the crop (mmpose's decode)
        to_image = invert_affine(pixel_affine(item["affine"][0].numpy(), S))
        want = u @ to_image[:, :2].T + to_image[:, 2]
        np.testing.assert_allclose(got[i], want, atol=2e-3)
    assert np.ptp(got, axis=0).max() > 1.0  # the estimates depend on the image


def test_flip_test_averages_as_derived_by_hand():
    """A net with constant output o: the flip-averaged joint 0 (r_ankle, mirror 5) is
    x = (o0x - o5x) / 2, y = (o0y + o5y) / 2; unshifted x gains 1 / (2 S). mmpose's formula on
    r = o + (S - 1) / (2 S) gives the same (S = 4: (0.475 + (1 - 0.075 - 0.25)) / 2 - 0.375 = 0.2)."""

    class Constant(nn.Module):
        def forward(self, x):
            out = torch.zeros(x.shape[0], 16, 2)
            out[:, 0] = torch.tensor([0.1, 0.2])
            out[:, 5] = torch.tensor([-0.3, 0.4])
            return out

    image = torch.zeros(1, 3, 4, 4)
    shifted = _module(Constant(), flip_test=True).eval().predict_normalised({"image": image})
    plain = _module(Constant(), flip_test=True, flip_shift=False).eval()
    assert shifted[0, 0].tolist() == pytest.approx([0.2, 0.3])
    assert shifted[0, 5].tolist() == pytest.approx([-0.2, 0.3])
    assert plain.predict_normalised({"image": image})[0, 0].tolist() == pytest.approx([0.325, 0.3])
    # training steps never flip
    train = _module(Constant(), flip_test=True).train()
    assert train.predict_normalised({"image": image})[0, 0].tolist() == pytest.approx([0.1, 0.2])


def test_mmpose_checkpoints_that_do_not_fit_are_refused_by_name(mmpose_file):
    from lightning_modules.mmpose_weights import map_mmpose_state, mmpose_state_dict

    path, _, state = mmpose_file
    net = DeepPoseResNet(depth=50, input_size=S)
    cut = {k: v for k, v in state.items() if k != "backbone.layer4.2.bn3.running_mean"}
    cut["head.fc.weight"] = cut.pop("keypoint_head.fc.weight")[:28]  # 1.x names, 14 joints
    cut["head.fc.bias"] = cut.pop("keypoint_head.fc.bias")[:28]
    cut["backbone.extra.weight"] = torch.zeros(3)
    assert mmpose_state_dict({"state_dict": cut}) is not None
    with pytest.raises(CheckpointError) as err:
        map_mmpose_state(cut, net, "cut.pth")
    msg = str(err.value)
    assert "cut.pth" in msg and "(ResNet-50, 14 joints)" in msg
    assert "1 missing: backbone.layer4.2.bn3.running_mean" in msg
    assert "1 unexpected: backbone.extra.weight (3,)" in msg
    assert "2 of another shape: head.fc.weight (28, 2048) (model: (32, 2048))" in msg
    with pytest.raises(CheckpointError, match="loads only into model=deeppose_r50"):
        _module(DeepPoseAlexNet(input_size=64, width=0.125, fc_dim=8)).load_init_weights(path)
    # a rimlab checkpoint of another network is refused too, naming what differs
    other = path.parent / "alexnet.ckpt"
    torch.save(
        {"state_dict": _module(DeepPoseAlexNet(input_size=64, width=0.125, fc_dim=8)).state_dict()},
        other,
    )
    with pytest.raises(CheckpointError, match="does not match the configured model"):
        _module(net).load_init_weights(other)


def test_smooth_l1_is_mmposes_weighted_mean():
    """mmpose: mean over B*K*2 of smooth_l1(pred * w, target * w) (beta 1); outside the crop
    (|n| > (S - 1) / (2 S)) w = 0."""
    pred = torch.tensor([[[0.1, -0.2], [0.3, 0.0], [2.0, 0.0]]], requires_grad=True)
    target = torch.tensor([[[0.0, 0.0], [float("nan"), 1.0], [0.4, 0.4]]])
    lab = torch.tensor([[1.0, 0.0, 1.0]])
    out = JointSmoothL1Loss()(pred, target, lab)
    # joint 0: 0.5 * (0.01 + 0.04); joint 2: |1.6| - 0.5 = 1.1 and 0.5 * 0.16
    want = (0.5 * 0.05 + 1.1 + 0.08) / 6
    assert out["loss"].item() == pytest.approx(want)
    out["loss"].backward()
    assert torch.isfinite(pred.grad).all() and pred.grad[0, 1].abs().sum() == 0
    # S = 4: the bound is 3 / 8 = 0.375; joint 2's target 0.4 lies outside and drops out
    assert JointSmoothL1Loss(crop_size=4)(pred, target, lab)["loss"].item() == pytest.approx(
        0.5 * 0.05 / 6
    )
    assert JointSmoothL1Loss(reduction="labelled")(pred, target, lab)["loss"].item() == (
        pytest.approx((0.5 * 0.05 + 1.1 + 0.08) / 4)
    )


def test_multistep_schedule_is_mmposes():
    from lightning_modules.schedulers import multistep_factor

    f = [multistep_factor(s, 10, (170, 200), 0.1, 500, 0.001) for s in (0, 250, 1699, 1700, 2000)]
    assert f == pytest.approx([0.001, 0.001 + 0.999 * 0.5, 1.0, 0.1, 0.01])
