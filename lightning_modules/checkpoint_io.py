"""Checkpoints that are either complete or absent (written to a temporary file, then renamed),
and read with errors that name the file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from datamodules.errors import FixableError
from datamodules.files import atomic_path, remove_stale_temporaries


class CheckpointError(FixableError, ValueError):
    """A checkpoint that is missing, unreadable or of the wrong format or network (names the file)."""


def read_checkpoint(path: str | os.PathLike) -> Any:
    """What ``torch.load`` finds in ``path``, on the CPU (``weights_only``: a file cannot run code).

    Raises:
        CheckpointError: the file does not exist or is not a torch checkpoint (truncated, another
            format).
    """
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated file, a non-torch file, a pickle of arbitrary objects
        # The reader's and unpickler's explanations run over many lines: the first sentences.
        cause = " ".join(str(err).split())
        if len(cause) > 300:
            cause = cause[:300].rsplit(". ", 1)[0] + ". ..."
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint ({cause})") from err


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves survive a kill mid-write.

    Lightning writes a checkpoint straight to its final name, so a process killed during the write
    leaves a truncated ``last.ckpt`` that the next resume trips over, and the previous good file is
    already gone. Here the bytes go to a hidden temporary file in the same folder, are flushed to
    disk, and only then replace the target (:func:`datamodules.files.atomic_path`); each save
    first deletes the temporaries that killed writers left.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        remove_stale_temporaries(path)
        with atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as handle:
            torch.save(checkpoint, handle)


def good_checkpoint(trainer: Any) -> str:
    """The newest checkpoint file of this run, or ``""``: every file the run wrote had finite
    weights (:func:`nonfinite_weights_message` refuses the others before a byte is written).

    Lightning's ``ModelCheckpoint`` names the file it is about to write before writing it, so a
    refused save leaves a path to a file that does not exist (a new name) or that still holds the
    previous, checked state (``last.ckpt``: writes are atomic, :class:`AtomicCheckpointIO`); only
    files that exist are named.
    """
    callbacks = trainer.checkpoint_callbacks if trainer is not None else []
    # An every-epoch callback (no monitor) holds the newest state, then last, then the best.
    saved = [cb.best_model_path for cb in callbacks if cb.monitor is None]
    saved += [p for cb in callbacks for p in (cb.last_model_path, cb.best_model_path)]
    return next((p for p in saved if p and Path(p).is_file()), "")


def nonfinite_weights_message(module: Any, at_checkpoint: bool = True) -> str | None:
    """Why ``module``'s weights must not be trained on or checkpointed, or None (all finite).

    One host sync: one flag per floating-point parameter, stacked on the device. A step whose
    loss is finite can still make the weights non-finite (a non-finite gradient, learning rate
    or optimizer state); those weights must never reach ``last.ckpt`` and be called good by the
    next message. ``at_checkpoint``: the message says the checkpoint about to be saved was not
    written; otherwise that the run stopped after the step (a read of the training steps found
    them). Under DDP the weights, and so the answer, are the same on every rank.
    """
    params = [(n, p) for n, p in module.named_parameters() if p.is_floating_point()]
    if not params:
        return None
    finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in params])  # (P,)
    if bool(finite.all()):
        return None
    bad = [n for (n, _), ok in zip(params, finite.tolist(), strict=True) if not ok]
    good = good_checkpoint(module._trainer)
    written = (
        "This checkpoint was not written"
        if at_checkpoint
        else "The run stopped after this step and nothing was written after it"
    )
    return (
        f"non-finite weights at global step {module.global_step} (epoch {module.current_epoch}) "
        f"in {len(bad)} of {len(params)} parameters (e.g. {', '.join(bad[:3])}), although "
        "every loss before was finite: an optimizer step since the last check made them so (a "
        "non-finite gradient, learning rate or optimizer state; or the weights it started from "
        f"were not finite). {written}; the last good checkpoint (weights checked finite when it "
        f"was written) is {good or 'not saved yet'}. Check optimizer.lr and the scheduler, or "
        "clip the gradients (trainer.gradient_clip_val)."
    )
