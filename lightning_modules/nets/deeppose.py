"""DeepPose regressors (Toshev & Szegedy, CVPR 2014): image crop -> 2k joint coordinates.

Plain ``nn.Module``s; every cascade stage is one of these with its own parameters. Outputs are
joints in the crop's normalised frame (box centre 0, side 1), shape ``(B, K, 2)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class DeepPoseAlexNet(nn.Module):
    """The paper's AlexNet-style regressor.

    ``C(11x11/4, 96) - LRN - P - C(5x5, 256) - LRN - P - C(3x3, 384) - C(3x3, 384) - C(3x3, 256) - P -
    F(4096) - F(4096) - F(2k)``, ReLU everywhere except the output, dropout on the F layers. At the
    paper's 220x220 input the feature maps are 55x55 (C1), 27x27 (C2) and 13x13 (C3-C5) as the paper
    lists them, and 6x6 after the last pooling (AlexNet's 9216 inputs to F1): C1 pads 4 pixels,
    ``(220 + 2 * 4 - 11) // 4 + 1 = 55``.

    Args:
        num_joints: k.
        input_size: crop side (220 in the paper; at least 64 for the pooling chain).
        width: channel multiplier (1 = the paper; smaller for CPU smoke runs).
        fc_dim: width of the two hidden F layers (4096 in the paper).
        dropout: dropout probability before each F layer.
        lrn: use local response normalisation (AlexNet's size 5, alpha 1e-4, beta 0.75, k 2).
        pretrained: unsupported (no ImageNet weights exist for this exact layout); kept as a key
            so configs can say ``model.pretrained=false`` uniformly.
    """

    def __init__(
        self,
        num_joints: int = 16,
        input_size: int = 220,
        width: float = 1.0,
        fc_dim: int = 4096,
        dropout: float = 0.5,
        lrn: bool = True,
        pretrained: bool = False,
    ) -> None:
        super().__init__()
        if pretrained:
            raise ValueError("DeepPoseAlexNet has no pretrained weights; use model=deeppose_r50")
        c = [max(8, int(round(v * width))) for v in (96, 256, 384, 384, 256)]

        def norm() -> nn.Module:
            return nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0) if lrn else nn.Identity()

        self.num_joints = int(num_joints)
        self.input_size = int(input_size)
        self.features = nn.Sequential(
            nn.Conv2d(3, c[0], 11, stride=4, padding=4),
            nn.ReLU(inplace=True),
            norm(),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(c[0], c[1], 5, padding=2),
            nn.ReLU(inplace=True),
            norm(),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(c[1], c[2], 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c[2], c[3], 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c[3], c[4], 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
        )
        with torch.no_grad():
            # 220 -> (B, 256, 6, 6); the F layers are sized for the configured input.
            flat = self.features(torch.zeros(1, 3, self.input_size, self.input_size)).numel()
        self.regressor = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(flat, fc_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(fc_dim, fc_dim),
            nn.ReLU(inplace=True),
            nn.Linear(fc_dim, 2 * self.num_joints),
        )

    def forward(self, image: Tensor) -> Tensor:
        """``(B, 3, S, S)`` -> joints ``(B, K, 2)`` in the normalised crop frame."""
        if image.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"input {tuple(image.shape[-2:])} but the F layers are sized for "
                f"{self.input_size}x{self.input_size}"
            )
        hidden = self.regressor[:-1](self.features(image))  # (B, fc_dim)
        return _fp32_head(self.regressor[-1], hidden).view(-1, self.num_joints, 2)


def _fp32_head(layer: nn.Linear, x: Tensor) -> Tensor:
    """The coordinate regressor outside autocast: in bf16 a normalised coordinate near 0.4 has
    steps of ~0.002 of the box side, pixels at MPII's scales."""
    with torch.autocast(x.device.type, enabled=False):
        return layer(x.float())


class DeepPoseResNet(nn.Module):
    """torchvision ResNet-50 with a 2k regression head (mmpose's DeepPose variant).

    Args:
        num_joints: k.
        depth: ResNet depth (50 as in mmpose's reference; 18 for small runs).
        input_size: crop side (any size works; kept for the data config).
        pretrained: load the ImageNet weights from the torch hub cache (never downloaded, see
            :func:`lightning_modules.nets.backbones.load_pretrained_state_dict`).
        weights: torchvision weights enum member.
    """

    def __init__(
        self,
        num_joints: int = 16,
        depth: int = 50,
        input_size: int = 256,
        pretrained: bool = False,
        weights: str = "IMAGENET1K_V1",
    ) -> None:
        super().__init__()
        import torchvision

        builders = {
            18: torchvision.models.resnet18,
            34: torchvision.models.resnet34,
            50: torchvision.models.resnet50,
            101: torchvision.models.resnet101,
        }
        if int(depth) not in builders:
            raise ValueError(f"depth={depth}: expected one of {sorted(builders)}")
        net = builders[int(depth)](weights=None)
        if pretrained:
            from lightning_modules.nets.backbones import load_pretrained_state_dict

            net.load_state_dict(load_pretrained_state_dict(int(depth), weights))
        self.num_joints = int(num_joints)
        self.input_size = int(input_size)
        self.depth = int(depth)
        net.fc = nn.Linear(net.fc.in_features, 2 * self.num_joints)
        # Start at the box centre: a zero head makes the first predictions 0 (normalised frame).
        nn.init.zeros_(net.fc.weight)
        nn.init.zeros_(net.fc.bias)
        self.net = net

    def forward(self, image: Tensor) -> Tensor:
        """``(B, 3, S, S)`` -> joints ``(B, K, 2)`` in the normalised crop frame."""
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(image))))
        x = n.layer4(n.layer3(n.layer2(n.layer1(x))))
        features = torch.flatten(n.avgpool(x), 1)  # (B, 2048) for depth 50
        return _fp32_head(n.fc, features).view(-1, self.num_joints, 2)  # (B, 2K) -> (B, K, 2)
