"""The DeepPose cascade stage as a LightningModule, and skeleton overlays.

One :class:`PoseRegressionLitModule` per cascade stage (each stage has its own parameters). The
same module serves both kinds of batches of :mod:`datamodules.mpii`:

- stage 1: ``image`` (B, 3, S, S) person crops; the net regresses all K joints in the crop's
  normalised frame;
- stage s >= 2: ``image`` (B, K, 3, S, S) uint8 (normalised here), one crop per joint centred on
  the previous estimate; the net sees every crop and, for crop j, its output ``slot[j]`` (joint
  j, or its mirror when the crop was flipped) is joint j's position, i.e. its displacement from
  the previous estimate in the crop's normalised frame (the paper's ``psi_i``).

Either way the prediction is (B, K, 2) in per-joint frames whose image -> frame maps are
``affine`` (B, K, 2, 3); the loss is L2 over labelled joints, and validation un-crops the
predictions to image pixels and scores PCKh/PCP.

Flip test (``flip_test=true``, evaluation only): the net also sees every crop mirrored, and its
output there is mirrored back and averaged with the plain one (mmpose's ``flip_test``). Mirroring
an S-pixel crop maps pixel u to S - 1 - u, i.e. ``n_x -> -n_x`` in the centred normalised frame:
mmpose's shifted flip ``1 - r - 1 / S`` of its [0, 1] frame (``shift_coords=True``,
``flip_shift=true``); its unshifted ``1 - r`` is ``-n_x + 1 / S`` here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn

from datamodules.pose_transforms import (
    MPII_FLIP_PAIRS,
    MPII_JOINTS,
    flip_permutation,
    normalise_images,
)
from lightning_modules import mmpose_weights
from lightning_modules.checkpoint_io import (
    CheckpointError,
    nonfinite_weights_message,
    read_checkpoint,
)
from lightning_modules.metrics import make_process_private
from lightning_modules.parsing import NonFiniteWeightsError
from lightning_modules.pose_metrics import PoseMetric
from lightning_modules.schedulers import per_step_optimization
from lightning_modules.step_state import (
    StepLog,
    log_epoch_means,
    read_points,
    read_step_log,
    stack_terms,
)

log = logging.getLogger(__name__)


def uncrop(pred: Tensor, affine: Tensor) -> Tensor:
    """Normalised per-joint predictions -> image pixels.

    Args:
        pred: (B, K, 2) joint j in the frame of ``affine[:, j]``.
        affine: (B, K, 2, 3) image -> normalised maps.

    Returns:
        (B, K, 2) float64 image coordinates.
    """
    a = affine.double()
    lin_inv = torch.linalg.inv(a[..., :2])  # (B, K, 2, 2)
    return torch.einsum("bkij,bkj->bki", lin_inv, pred.double() - a[..., 2])


class PoseRegressionLitModule(pl.LightningModule):
    """One DeepPose cascade stage.

    Args:
        net: ``(N, 3, S, S)`` -> ``(N, K, 2)`` regressor.
        loss: ``loss(pred, target, labelled) -> {"loss": ..., ...}``.
        optimizer: partial optimizer taking ``params``.
        scheduler: partial ``(optimizer, steps_per_epoch) -> LRScheduler`` stepped every step.
        stage: the cascade stage this module is (1 = whole-person regressor).
        num_joints: K.
        joint_names: K names for logs.
        flip_test: evaluate with the mirrored crops averaged in (see the module docstring).
        flip_shift: mmpose's ``shift_coords`` (the exact pixel mirror; false = mmpose's unshifted
            ``1 - r``).
        flip_pairs: left/right joint pairs (the mirrored output of joint j is joint perm[j]'s).
    """

    def __init__(
        self,
        net: nn.Module,
        loss: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        stage: int = 1,
        num_joints: int = 16,
        joint_names: Sequence[str] = MPII_JOINTS,
        flip_test: bool = False,
        flip_shift: bool = True,
        flip_pairs: Sequence[Sequence[int]] = MPII_FLIP_PAIRS,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["net", "loss", "optimizer", "scheduler"])
        self.flip_test, self.flip_shift = bool(flip_test), bool(flip_shift)
        perm = flip_permutation(int(num_joints), [tuple(p) for p in flip_pairs])
        self.register_buffer("flip_perm", torch.from_numpy(perm), persistent=False)
        self.net = net
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.stage = int(stage)
        self.num_joints = int(num_joints)
        self.joint_names = list(joint_names)
        self.val_metric = PoseMetric(num_joints, self.joint_names)
        self.val_scores: dict[str, Any] | None = None
        # Read by the shared StageEnd callback (experiments.build.build_trainer); pose scores are
        # written by the cascade driver instead.
        self.last_scores: dict[str, Any] = {}
        self.class_names: list[str] = self.joint_names
        # Each step's loss terms, kept on the device and read every trainer.log_every_n_steps
        # steps (check_finite): a check or a self.log in the step would cost the host each step.
        self._step_log = StepLog()

    def setup(self, stage: str) -> None:
        make_process_private(self)  # ddp_spawn shares the pickled tensors between processes

    # ------------------------------------------------------------------ forward

    def forward(self, image: Tensor) -> Tensor:
        """``(N, 3, S, S)`` -> ``(N, K, 2)``."""
        return self.net(image)

    def predict_normalised(self, batch: dict[str, Any]) -> Tensor:
        """(B, K, 2) predictions, joint j in the normalised frame of its crop (``affine[:, j]``)."""
        image = batch["image"]
        if image.dtype == torch.uint8:
            # Stage >= 2 crops travel as uint8 (a quarter of the float size): normalised here.
            image = normalise_images(image)
        if image.dim() == 4:
            return self._evaluate(image)
        b, k = image.shape[:2]
        # (B, K, 3, S, S) -> (B*K, 3, S, S) -> (B*K, K, 2)
        out = self._evaluate(image.flatten(0, 1))
        out = out.view(b, k, self.num_joints, 2)
        slot = batch["slot"]  # (B, K): the output of crop j that is its joint
        idx = slot[..., None, None].expand(b, k, 1, 2)
        return out.gather(2, idx).squeeze(2)  # (B, K, 1, 2) -> (B, K, 2)

    def _evaluate(self, image: Tensor) -> Tensor:
        """``(N, 3, S, S)`` -> ``(N, K, 2)``, flip-test averaged in evaluation when switched on."""
        out = self(image)
        if not self.flip_test or self.training:
            return out
        mirrored = self(image.flip(-1))  # (N, K, 2) in the mirrored crop's frame
        x = -mirrored[..., 0] + (0.0 if self.flip_shift else 1.0 / image.shape[-1])
        # output j of the mirrored crop is joint perm[j] of the crop
        back = torch.stack([x, mirrored[..., 1]], -1)[:, self.flip_perm]
        return 0.5 * (out + back)

    def load_init_weights(self, path: str | Any) -> None:
        """Loads the net weights of a checkpoint, nothing of its training state.

        Args:
            path: a rimlab Lightning checkpoint (``.ckpt``), a bare state dict of this module,
                or a published mmpose DeepPose ``.pth`` (detected by its layout; mapped by
                :mod:`lightning_modules.mmpose_weights`, output convention converted).

        Raises:
            CheckpointError: the file is missing, unreadable, of another format, or its network
                does not match the configured one (naming the tensors).
        """
        ckpt = read_checkpoint(path)
        state = mmpose_weights.mmpose_state_dict(ckpt)
        if state is not None:
            mapped = mmpose_weights.map_mmpose_state(state, self.net, path)
            self.net.net.load_state_dict(mapped)
            return
        if not isinstance(ckpt, dict):
            raise CheckpointError(f"{path}: not a Lightning checkpoint nor an mmpose DeepPose one")
        state = ckpt.get("state_dict", ckpt)
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
        if missing or unexpected or wrong:
            raise CheckpointError(
                f"{path}: the checkpoint's network does not match the configured model "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]}, other shape "
                f"{[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in wrong[:3]]}; "
                "another model, depth or width?)"
            )
        self.load_state_dict(state)

    def predict_image(self, batch: dict[str, Any]) -> Tensor:
        """(B, K, 2) float64 predictions in image pixels."""
        return uncrop(self.predict_normalised(batch), batch["affine"])

    # ------------------------------------------------------------------ steps

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        pred = self.predict_normalised(batch)
        losses = self.loss(pred, batch["target"], batch["labelled"])
        bs = batch["target"].shape[0]
        self._step_log.add_terms(self.global_step, tuple(losses), stack_terms(losses), bs)
        return losses["loss"]

    def on_fit_start(self) -> None:
        self._step_log = StepLog()  # nothing of an interrupted earlier fit

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        read, log_now = read_points(self.trainer, batch_idx)
        if read:
            self.check_finite(log=log_now)

    def check_finite(self, log: bool = False) -> None:
        """Reads the loss terms kept since the last read (one host transfer), raises on the
        first non-finite one, and with ``log`` writes the last step's terms as
        ``train/<term>_step``.

        Under DDP every rank calls it at the same step and the findings are gathered
        (:func:`~lightning_modules.step_state.gather_nonfinite`), so all of them stop together
        (a rank stopping alone would leave the others waiting).

        Raises:
            FloatingPointError: with the step and the loss terms of that step.
        """
        found = read_step_log(self, self._step_log, log=log)
        if found is not None:
            event, terms = found
            raise FloatingPointError(
                f"stage {self.stage}: non-finite loss at step {event.step}: {terms}"
            )

    def on_train_epoch_end(self) -> None:
        self.check_finite()
        log_epoch_means(self, self._step_log)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Before anything is written, on every rank: no checkpoint file holds non-finite weights,
        # nor those of a non-finite step not read yet (a save between two reads).
        self.check_finite()
        message = nonfinite_weights_message(self)
        if message is not None:
            raise NonFiniteWeightsError(f"stage {self.stage}: {message}")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        pred = self.predict_normalised(batch)
        losses = self.loss(pred, batch["target"], batch["labelled"])
        bs = batch["target"].shape[0]
        self.log("val/loss", losses["loss"], on_epoch=True, batch_size=bs, sync_dist=True)
        self.val_metric.update(
            uncrop(pred, batch["affine"]), batch["keypoints"], batch["labelled"], batch["head_size"]
        )

    def on_validation_epoch_end(self) -> None:
        scores = self.val_metric.compute()
        self.val_metric.reset()
        self.val_scores = scores
        keys = (
            "PCKh",
            "PCKh@0.1",
            "PCP",
            "Head",
            "Shoulder",
            "Elbow",
            "Wrist",
            "Hip",
            "Knee",
            "Ankle",
        )
        for key in keys:
            value = scores.get(key)
            # A joint with no labelled instance in the split gives NaN: leave it out of the logs.
            if value is not None and math.isfinite(value):
                self.log(f"val/{key}", value)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        return {"index": batch["index"], "pred": self.predict_image(batch)}

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        return per_step_optimization(
            self.trainer, self.optimizer_factory, self.scheduler_factory, params
        )


# ---------------------------------------------------------------------- overlays

SKELETON: tuple[tuple[int, int], ...] = (
    (0, 1), (1, 2), (2, 6), (6, 3), (3, 4), (4, 5), (6, 7), (7, 8), (8, 9),
    (10, 11), (11, 12), (12, 7), (7, 13), (13, 14), (14, 15),
)  # fmt: skip


def draw_skeleton(
    image: np.ndarray,
    joints: np.ndarray,
    labelled: np.ndarray | None = None,
    colour: tuple[int, int, int] = (255, 64, 64),
    thickness: int = 2,
) -> np.ndarray:
    """A copy of ``image`` (H, W, 3) uint8 with the skeleton of ``joints`` (K, 2) drawn on it
    (limbs with an unlabelled end are left out)."""
    import cv2

    out = np.ascontiguousarray(image.copy())
    lab = np.ones(len(joints), bool) if labelled is None else np.asarray(labelled) > 0
    pts = [tuple(int(round(v)) for v in p) for p in np.nan_to_num(joints)]
    for a, b in SKELETON:
        if lab[a] and lab[b]:
            cv2.line(out, pts[a], pts[b], colour, thickness, cv2.LINE_AA)
    for j, p in enumerate(pts):
        if lab[j]:
            cv2.circle(out, p, thickness + 1, colour, -1, cv2.LINE_AA)
    return out
