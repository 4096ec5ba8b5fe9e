"""Pose metrics: PCKh by the official MPII rule, the per-joint table, PCKh@0.1 and PCP.

PCKh (official toolkit, HRNet and mmpose 0.x ``evaluate``): a joint is correct when
``||pred - gt|| / head_size <= thr`` with ``head_size`` = 0.6 x head-box diagonal; only *labelled*
joints count (``jnt_missing``, not ``is_visible``); the mean leaves out pelvis (6) and thorax (7)
and weights joints by their counts, i.e. it is total hits / total labelled over the other 14
joints. The table averages left and right PCKh values (HRNet's ``Shoulder = (PCKh[13]+PCKh[12])/2``);
its Head column is head_top alone (joint 9, as HRNet and mmpose): upper_neck (8) has no column but
counts in the mean.
``PCKh@0.1`` uses 0.1 (HRNet's ``Mean@0.1`` is an off-by-one at 0.11). All values are percent.

PCP (strict): a limb is correct when both of its end joints lie within ``alpha`` x the ground-truth
limb length of their ground truth; only limbs with both ends labelled count.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric

from datamodules.pose_transforms import MPII_JOINTS

#: The table of the MPII papers: name -> joint ids (averaged). Head is head_top only (HRNet's and
#: mmpose's ``PCKh[9]``); upper_neck is in the mean but in no column.
PCKH_TABLE: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("Head", (9,)),
    ("Shoulder", (13, 12)),
    ("Elbow", (14, 11)),
    ("Wrist", (15, 10)),
    ("Hip", (3, 2)),
    ("Knee", (4, 1)),
    ("Ankle", (5, 0)),
)
#: Joints left out of the mean PCKh.
EXCLUDED_FROM_MEAN: tuple[int, ...] = (6, 7)
#: PCP limbs: kind -> (joint a, joint b) pairs.
PCP_LIMBS: tuple[tuple[str, tuple[tuple[int, int], ...]], ...] = (
    ("Torso", ((7, 6),)),
    ("Head", ((8, 9),)),
    ("Upper arm", ((12, 11), (13, 14))),
    ("Lower arm", ((11, 10), (14, 15))),
    ("Upper leg", ((2, 1), (3, 4))),
    ("Lower leg", ((1, 0), (4, 5))),
)
LIMB_PAIRS: tuple[tuple[int, int], ...] = tuple(p for _, pairs in PCP_LIMBS for p in pairs)
THRESHOLDS: tuple[float, ...] = (0.5, 0.1)


def pckh_counts(
    pred: np.ndarray,
    gt: np.ndarray,
    labelled: np.ndarray,
    head_size: np.ndarray,
    thresholds: Sequence[float] = THRESHOLDS,
) -> tuple[np.ndarray, np.ndarray]:
    """Hits per threshold and joint, and labelled counts per joint.

    Args:
        pred, gt: (N, K, 2) in the same pixel frame.
        labelled: (N, K) flags.
        head_size: (N,).

    Returns:
        ``hits`` (T, K) int64 and ``counts`` (K,) int64.
    """
    lab = np.asarray(labelled) > 0
    dist = np.linalg.norm(np.asarray(pred, np.float64) - np.asarray(gt, np.float64), axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        scaled = dist / np.asarray(head_size, np.float64)[:, None]  # (N, K)
    hits = np.stack([((scaled <= t) & lab).sum(0) for t in thresholds]).astype(np.int64)
    return hits, lab.sum(0).astype(np.int64)


def pcp_counts(
    pred: np.ndarray, gt: np.ndarray, labelled: np.ndarray, alpha: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Strict PCP hits and counts per limb of :data:`LIMB_PAIRS`.

    Returns:
        ``hits`` (P,) int64 and ``counts`` (P,) int64.
    """
    pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
    lab = np.asarray(labelled) > 0
    err = np.linalg.norm(pred - gt, axis=-1)  # (N, K)
    hits, counts = [], []
    for a, b in LIMB_PAIRS:
        ok = lab[:, a] & lab[:, b]
        length = np.linalg.norm(gt[:, a] - gt[:, b], axis=-1)
        good = ok & (err[:, a] <= alpha * length) & (err[:, b] <= alpha * length)
        hits.append(good.sum())
        counts.append(ok.sum())
    return np.asarray(hits, np.int64), np.asarray(counts, np.int64)


def _ratio(hits: Any, counts: Any) -> float:
    hits, counts = float(np.sum(hits)), float(np.sum(counts))
    return 100.0 * hits / counts if counts > 0 else float("nan")


def pose_scores(
    hits: np.ndarray,
    counts: np.ndarray,
    pcp_hits: np.ndarray | None = None,
    pcp_count: np.ndarray | None = None,
    thresholds: Sequence[float] = THRESHOLDS,
    joint_names: Sequence[str] = MPII_JOINTS,
) -> dict[str, Any]:
    """The results entry from accumulated counts.

    Returns:
        ``{"PCKh": mean@0.5, "PCKh@0.1": mean@0.1, "Head": .., ..., "Ankle": .., "PCP": ..,
        "joints": {name: PCKh@0.5}, "joint_counts": {name: n}, "PCP_limbs": {kind: ..}}``.
    """
    hits, counts = np.asarray(hits), np.asarray(counts)
    thresholds = [float(t) for t in thresholds]
    with np.errstate(invalid="ignore", divide="ignore"):
        per_joint = np.where(counts > 0, 100.0 * hits / np.maximum(counts, 1), np.nan)  # (T, K)
    keep = [j for j in range(len(counts)) if j not in EXCLUDED_FROM_MEAN]
    i05 = thresholds.index(0.5)
    out: dict[str, Any] = {"PCKh": _ratio(hits[i05, keep], counts[keep])}
    for t_i, t in enumerate(thresholds):
        if t != 0.5:
            out[f"PCKh@{t:g}"] = _ratio(hits[t_i, keep], counts[keep])
    for name, ids in PCKH_TABLE:
        out[name] = float(np.mean(per_joint[i05, list(ids)]))
    out["joints"] = {n: float(per_joint[i05, j]) for j, n in enumerate(joint_names)}
    out["joint_counts"] = {n: int(counts[j]) for j, n in enumerate(joint_names)}
    if pcp_hits is not None and pcp_count is not None:
        out["PCP"] = _ratio(pcp_hits, pcp_count)
        limbs, start = {}, 0
        for kind, pairs in PCP_LIMBS:
            sl = slice(start, start + len(pairs))
            limbs[kind] = _ratio(pcp_hits[sl], pcp_count[sl])
            start += len(pairs)
        out["PCP_limbs"] = limbs
    return out


def evaluate_pose(
    pred: np.ndarray, gt: np.ndarray, labelled: np.ndarray, head_size: np.ndarray
) -> dict[str, Any]:
    """PCKh (table, @0.5, @0.1) and PCP of predictions ``pred`` (N, K, 2) against ``gt``."""
    hits, counts = pckh_counts(pred, gt, labelled, head_size)
    ph, pc = pcp_counts(pred, gt, labelled)
    return pose_scores(hits, counts, ph, pc)


def evaluate_official(
    pred: np.ndarray, gt_val_mat: str | Path, persons: Sequence[int] | None = None
) -> dict[str, Any]:
    """Scores 0-based predictions (N, 16, 2) against the official ``mpii_gt_val.mat``.

    The predictions get +1 (the gt file is MATLAB 1-based); order = ``mpii_val.json``.

    Args:
        persons: the gt rows ``pred`` holds (the dataset's ``source_index``), when the loader
            skipped persons without a usable box; None = all rows.
    """
    from datamodules.mpii_annotations import load_gt_val_mat

    head, joints, missing = load_gt_val_mat(gt_val_mat)
    if persons is not None:
        rows = np.asarray(persons, np.int64)
        head, joints, missing = head[rows], joints[rows], missing[rows]
    pred = np.asarray(pred, np.float64) + 1.0
    if pred.shape != joints.shape:
        raise ValueError(f"predictions {pred.shape} but {gt_val_mat} holds {joints.shape}")
    return evaluate_pose(pred, joints, ~missing, head)


def pckh_columns(joint_names: Sequence[str] = MPII_JOINTS) -> str:
    """Which joints each PCKh column averages, e.g. ``Head = head_top; Shoulder = l/r_shoulder``."""
    parts = []
    for name, ids in PCKH_TABLE:
        names = [joint_names[j] for j in ids]
        if len(names) == 2 and names[0][2:] == names[1][2:]:
            parts.append(f"{name} = l/r_{names[0][2:]}")
        else:
            parts.append(f"{name} = {' + '.join(names)}")
    mean = [joint_names[j] for j in range(len(joint_names)) if j not in EXCLUDED_FROM_MEAN]
    excluded = ", ".join(joint_names[j] for j in EXCLUDED_FROM_MEAN)
    return "; ".join(parts) + f"; PCKh = mean of {len(mean)} joints (all but {excluded})"


def format_pose_table(scores: dict[str, Any], title: str = "") -> str:
    """One line of headers, one of values (like the MPII papers' tables) and one naming the joints
    of each column (:func:`pckh_columns`)."""
    keys = [n for n, _ in PCKH_TABLE] + ["PCKh", "PCKh@0.1", "PCP"]
    head = " | ".join(f"{k:>8}" for k in keys)
    vals = " | ".join(f"{scores.get(k, float('nan')):8.2f}" for k in keys)
    return "\n".join(x for x in (title, head, vals, pckh_columns()) if x)


class PoseMetric(Metric):
    """Accumulates PCKh (at :data:`THRESHOLDS`) and PCP counts; DDP-synced by torchmetrics.

    ``update(pred, gt, labelled, head_size)`` with (B, K, 2), (B, K, 2), (B, K), (B,) tensors in
    image pixels.
    """

    full_state_update = False

    def __init__(self, num_joints: int = 16, joint_names: Sequence[str] = MPII_JOINTS) -> None:
        super().__init__()
        self.joint_names = list(joint_names)
        t = len(THRESHOLDS)
        self.add_state("hits", torch.zeros(t, num_joints, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(num_joints, dtype=torch.long), dist_reduce_fx="sum")
        p = len(LIMB_PAIRS)
        self.add_state("pcp_hits", torch.zeros(p, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("pcp_counts", torch.zeros(p, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self, pred: torch.Tensor, gt: torch.Tensor, labelled: torch.Tensor, head_size: torch.Tensor
    ) -> None:
        # Counted on the tensors' device with torch ops: no host sync per batch (the counts reach
        # the host once, in compute()). Same arithmetic as pckh_counts / pcp_counts, in float64.
        pred, gt = pred.detach().double(), gt.detach().double()
        lab = labelled.detach() > 0  # (B, K)
        diff = pred - gt
        err = (diff * diff).sum(-1).sqrt()  # (B, K), = np.linalg.norm(..., axis=-1)
        # NaN head sizes give NaN ratios, which are never <= thr: the joint counts, never hits.
        scaled = err / head_size.detach().double().reshape(-1, 1)
        for t_i, t in enumerate(THRESHOLDS):
            self.hits[t_i] += ((scaled <= t) & lab).sum(0)
        self.counts += lab.sum(0)
        a, b = (torch.as_tensor(x, device=pred.device) for x in zip(*LIMB_PAIRS, strict=True))
        ok = lab[:, a] & lab[:, b]  # (B, P)
        dlimb = gt[:, a] - gt[:, b]
        length = (dlimb * dlimb).sum(-1).sqrt()
        good = ok & (err[:, a] <= 0.5 * length) & (err[:, b] <= 0.5 * length)
        self.pcp_hits += good.sum(0)
        self.pcp_counts += ok.sum(0)

    def compute(self) -> dict[str, Any]:
        return pose_scores(
            self.hits.cpu().numpy(),
            self.counts.cpu().numpy(),
            self.pcp_hits.cpu().numpy(),
            self.pcp_counts.cpu().numpy(),
            joint_names=self.joint_names,
        )
