"""Checkpoints that are either complete or absent (written to a temporary file, then renamed),
and read with errors that name the file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from datamodules.errors import FixableError


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
    disk, and only then replace the target (``os.replace`` is atomic on POSIX).
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def _remove_stale_temporaries(path: Path) -> None:
    """Deletes half-written temporaries of ``path`` left by killed processes (not by live ones)."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
            os.kill(pid, 0)  # raises if no such process
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (ValueError, PermissionError):
            continue  # not ours, or another user's live process
