"""Loggers that keep a run going when their service does not answer."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import Logger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)

DEFAULT_WANDB_HOST = "https://api.wandb.ai"


def host_reachable(url: str, timeout: float) -> bool:
    """Whether a TCP connection to ``url``'s host and port opens within ``timeout`` seconds.

    Name resolution has no timeout of its own, so the whole attempt runs in a daemon thread that
    is simply abandoned when it takes too long.
    """
    parsed = urlparse(url if "://" in url else f"https://{url}")
    host = parsed.hostname or ""
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    result: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` that never blocks a run on a missing network.

    An online run first checks (``probe_timeout`` seconds) that the W&B host answers; if it does
    not, the run is logged offline with a warning, to be uploaded later with ``wandb sync``.
    ``init_timeout`` bounds ``wandb.init`` when the host answers but the service is slow.
    ``WANDB_MODE=offline|disabled`` in the environment is respected as usual.

    Args:
        offline: log offline from the start (the rimlab default).
        probe_timeout: seconds to wait for a TCP connection to the W&B host.
        init_timeout: seconds ``wandb.init`` may take.
        **kwargs: as for :class:`lightning.pytorch.loggers.WandbLogger` (and ``wandb.init``).
    """

    def __init__(
        self,
        *args: Any,
        offline: bool = False,
        probe_timeout: float = 3.0,
        init_timeout: float = 60.0,
        **kwargs: Any,
    ) -> None:
        mode = os.environ.get("WANDB_MODE", "")
        if not offline and mode not in ("offline", "disabled", "dryrun"):
            host = os.environ.get("WANDB_BASE_URL", DEFAULT_WANDB_HOST)
            if not host_reachable(host, probe_timeout):
                log.warning(
                    "W&B host %s did not answer within %.0f s: logging offline instead; upload "
                    "the run later with `wandb sync <run dir>/wandb/offline-run-*`",
                    host,
                    probe_timeout,
                )
                offline = True
        if "settings" not in kwargs:
            import wandb

            kwargs["settings"] = wandb.Settings(init_timeout=float(init_timeout))
        super().__init__(*args, offline=offline, **kwargs)


# results.json scores key -> W&B summary column. Both MPA readings, so the runs table can sort
# and average by either whatever metrics.mpa a run used.
SUMMARY_KEYS = {
    "PA": "final/PA",
    "mRecall": "final/MPA_recall",
    "mPrecision": "final/MPA_precision",
    "mIoU": "final/mIoU",
    "mAcc": "final/mAcc",
}


def final_summary(scores: Mapping[str, Any] | None) -> dict[str, float]:
    """The W&B summary columns of a results.json scores entry (``final/PA``,
    ``final/MPA_recall``, ``final/MPA_precision``, ``final/mIoU``, ...; missing ones left out)."""
    scores = scores or {}
    out = {col: float(scores[k]) for k, col in SUMMARY_KEYS.items() if scores.get(k) is not None}
    if "final/MPA_recall" not in out and scores.get("mAcc") is not None:
        out["final/MPA_recall"] = float(scores["mAcc"])  # mmseg's mAcc is the recall reading
    return out


@rank_zero_only
def finish_wandb(loggers: Iterable[Logger], scores: Mapping[str, Any] | None = None) -> None:
    """Writes ``scores``' final columns into each W&B logger's run summary and ends the run.

    Call it after a fit's own evaluation: Lightning's ``WandbLogger`` attaches to ``wandb.run``
    when one is active, so without it the next fit of the job (baseline after stage 1, stage 2)
    would log into this run instead of its own.
    """
    for logger in loggers:
        if not isinstance(logger, _LightningWandbLogger):
            continue
        run = logger.experiment
        run.summary.update(final_summary(scores))
        run.finish()
