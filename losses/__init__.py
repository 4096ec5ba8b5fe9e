"""Losses for dense prediction: pure functions (``functional``) and thin ``nn.Module`` wrappers.

Only torch is imported here, so the losses can be unit-tested and reused outside Lightning.
"""

from __future__ import annotations

from losses import functional
from losses.ce2p import CE2PLoss, soft_cross_entropy
from losses.edge import BalancedEdgeLoss, ParsingEdgeConsistencyLoss, edge_targets
from losses.functional import cross_entropy, focal_loss, inter_class_loss
from losses.lovasz import LovaszSoftmaxLoss, lovasz_softmax
from losses.modules import CrossEntropyLoss, FocalLoss, InterClassLoss, ParsingLoss

__all__ = [
    "BalancedEdgeLoss",
    "CE2PLoss",
    "CrossEntropyLoss",
    "FocalLoss",
    "InterClassLoss",
    "LovaszSoftmaxLoss",
    "ParsingEdgeConsistencyLoss",
    "ParsingLoss",
    "cross_entropy",
    "edge_targets",
    "focal_loss",
    "functional",
    "inter_class_loss",
    "lovasz_softmax",
    "soft_cross_entropy",
]
