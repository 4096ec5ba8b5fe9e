"""Losses for dense prediction: pure functions (``functional``) and thin ``nn.Module`` wrappers.

Only torch is imported here, so the losses can be unit-tested and reused outside Lightning.
"""

from __future__ import annotations

from losses import functional
from losses.functional import cross_entropy, focal_loss, inter_class_loss
from losses.modules import CrossEntropyLoss, FocalLoss, InterClassLoss, ParsingLoss

__all__ = [
    "CrossEntropyLoss",
    "FocalLoss",
    "InterClassLoss",
    "ParsingLoss",
    "cross_entropy",
    "focal_loss",
    "functional",
    "inter_class_loss",
]
