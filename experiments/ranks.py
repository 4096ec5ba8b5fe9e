"""Which process does what: the ranks of one launch and the jobs of one sweep.

Under the ``ddp`` subprocess launcher, torchrun or SLURM every rank runs the whole driver. Only
launcher rank 0 decides and writes; the other ranks follow what it publishes:

- a shared run (stage 1, the baseline) is reused or trained under a file lock that only rank 0
  takes (:func:`coordinated`). Rank 0 publishes its decision in a small file named after the launch
  (:func:`launch_token`); deciding on their own, the other ranks could see a different state of
  the shared folder (another sweep job finishing stage 1 in between) and enter a different ``fit``
  than their rank 0, which hangs or crashes the job;
- between DeepPose cascade stages rank 0 runs the cascade and publishes the stage's outcome in
  ``handoff.json`` (:func:`publish_handoff`, :func:`await_handoff`), with the id of the launch
  (:func:`launch_id`).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from lightning.fabric.utilities.rank_zero import _get_rank

from datamodules.errors import FixableError
from datamodules.files import write_json

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Environment variable carrying the launch id to the ranks Lightning's ``ddp`` launcher starts.
LAUNCH_ENV = "RIMLAB_POSE_LAUNCH"


def launcher_rank() -> int:
    """Global rank of this process as launched (0 for the process a user started).

    Under the ``ddp`` subprocess launcher, torchrun or SLURM every rank runs the driver; only rank
    0 takes the file lock, or the others would wait on it while rank 0 waits for them to join.
    """
    return int(_get_rank() or 0)


def launch_token() -> str | None:
    """An id shared by all ranks of one external launch (torchrun, multi-task SLURM), else None.

    Under Lightning's own ``ddp`` launcher the other ranks are started from inside rank 0's
    ``fit``, after rank 0 has decided, so they need no token.
    """
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env and int(env.get("WORLD_SIZE", "1")) > 1:
        keys = ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT")
        prefix = "torchrun"
    elif "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        keys = ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_RESTART_COUNT")
        prefix = "slurm"
    else:
        return None
    raw = "-".join([prefix, *(env.get(k, "") for k in keys)])
    return re.sub(r"[^A-Za-z0-9_.-]", "_", raw)


def launch_id(rank: int) -> str | None:
    """An id shared by the ranks of this launch: torchrun/SLURM's, or one rank 0 makes and puts
    in the environment before its first fit (Lightning's ``ddp`` launcher copies it to the ranks
    it starts). None on a non-zero rank that got neither (handoffs then match by hash only)."""
    token = launch_token()
    if token:
        return token
    if rank == 0:
        os.environ[LAUNCH_ENV] = uuid.uuid4().hex
    return os.environ.get(LAUNCH_ENV)


def wait_for_rank0(read: Callable[[], T | None], what: str, poll_s: float = 0.5) -> T:
    """Polls ``read`` until it returns something other than None, logging every 10 minutes.

    For ranks that wait on a file rank 0 writes (rank 0 may itself wait hours for a lock, or run
    a long evaluation); ``read`` may raise to stop waiting.
    """
    started = last_log = time.monotonic()
    while (value := read()) is None:
        if time.monotonic() - last_log > 600:
            log.info(
                "still waiting for rank 0's %s (%.0f min)", what, (time.monotonic() - started) / 60
            )
            last_log = time.monotonic()
        time.sleep(poll_s)
    return value


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object at ``path``, or None when it is missing or half-written elsewhere."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------- shared runs of a sweep

# When this process started (all ranks of one launch start within minutes of each other), and
# how many coordinated decisions it has made: every rank makes the same sequence of them (a Hydra
# multirun inside one launch makes several), so (token, call) names one decision of one launch.
_PROCESS_START = time.time()
_CALLS = itertools.count()
# A decision whose rank 0 started this much earlier or later belongs to another launch that
# happened to get the same token (torchrun with a fixed port and no rendezvous id).
_SAME_LAUNCH_S = 600.0


def _decision_path(lock: Path, token: str, call: int) -> Path:
    return lock.with_name(f"{lock.name}.{token}.{call}.decision")


def _read_decision(path: Path) -> bool | None:
    """Rank 0's decision at ``path`` if it was made in this launch, else None."""
    decision = read_json(path)
    if decision is None:
        return None
    if abs(float(decision.get("started", 0.0)) - _PROCESS_START) > _SAME_LAUNCH_S:
        return None
    return bool(decision["reuse"])


def _await_decision(lock: Path, token: str, call: int, poll_s: float = 0.5) -> bool:
    """Waits for rank 0 of this launch to publish its reuse/train decision; returns reuse."""
    path = _decision_path(lock, token, call)
    return wait_for_rank0(
        lambda: _read_decision(path), f"decision on {lock.with_suffix('')}", poll_s
    )


class LockError(FixableError, OSError):
    """The shared runs' folder is on a filesystem whose ``flock`` does not work."""


#: Run in a second process: exit 0 when it could take the lock the first process holds.
_PROBE = (
    "import fcntl, sys\n"
    "with open(sys.argv[1], 'a') as f:\n"
    "    try:\n"
    "        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
    "    except BlockingIOError:\n"
    "        sys.exit(3)\n"
)


def exclusive_lock(handle: Any, lock: Path, probe: bool = True) -> None:
    """Takes ``flock(LOCK_EX)`` on ``handle`` (the open ``lock`` file) and checks that it excludes.

    Parallel sweep jobs rely on the lock to train a shared stage 1 once. Some filesystems (NFS
    without a lock daemon, some FUSE and object-store mounts) refuse ``flock``, and some accept it
    without excluding anyone; then two jobs would train into the same folder. The check asks a
    second process to take the same lock without waiting: it must be refused. (A second process,
    since NFS emulates ``flock`` with POSIX locks, which one process can always take twice.)

    Raises:
        LockError: ``flock`` fails, or a second process could take the lock.
    """
    what = (
        f"The shared runs' folder {lock.parent} is on a filesystem without working file locks "
        "(flock), which parallel jobs need to train a shared stage 1 once"
    )
    fix = (
        "Put the shared runs on a filesystem with working locks (schedule.stage1_dir=<a local or "
        "lock-capable folder>, or mount NFS with its lock daemon), or run the jobs one after "
        "another."
    )
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
    except OSError as err:
        raise LockError(f"{what}: flock failed ({err}). {fix}") from err
    if not probe:
        return
    try:
        rc = subprocess.run(
            [sys.executable, "-c", _PROBE, str(lock)], capture_output=True, timeout=60
        ).returncode
    except (OSError, subprocess.TimeoutExpired):
        return  # cannot ask a second process: the lock taken above is the best available
    if rc == 0:
        fcntl.flock(handle, fcntl.LOCK_UN)
        raise LockError(f"{what}: a second process took the lock this one holds. {fix}")


@contextlib.contextmanager
def coordinated(lock: Path, finished: Callable[[], bool]) -> Iterator[bool]:
    """Holds ``lock`` (rank 0 only) and yields whether the shared run can be reused.

    Rank 0 evaluates ``finished`` under the lock; the other ranks of an external launch use
    rank 0's published answer, so every rank enters the same ``fit``.
    """
    token = launch_token()
    call = next(_CALLS)
    if launcher_rank() != 0:
        yield _await_decision(lock, token, call) if token else finished()
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as handle:
        exclusive_lock(handle, lock)
        try:
            reuse = finished()
            if token:
                write_json(
                    _decision_path(lock, token, call),
                    {"reuse": reuse, "started": _PROCESS_START},
                )
            yield reuse
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------------- cascade hand-offs


def publish_handoff(stage_dir: Path, digest: str, launch: str | None, **outcome: Any) -> None:
    """Rank 0's outcome of a cascade stage (``entry`` and ``displacement``, or ``error``) for the
    other ranks, in ``stage_dir/handoff.json`` (NaN kept: they read the very values rank 0 used)."""
    write_json(
        stage_dir / "handoff.json", {"hash": digest, "launch": launch, **outcome}, keep_nan=True
    )


def await_handoff(
    stage_dir: Path, digest: str, launch: str | None, poll_s: float = 0.5
) -> dict[str, Any]:
    """Waits for rank 0's ``handoff.json`` of this stage (same config hash and launch id)."""
    path = stage_dir / "handoff.json"
    parent = os.getppid()

    def read() -> dict[str, Any] | None:
        handoff = read_json(path) if path.is_file() else None
        if (
            handoff is not None
            and handoff.get("hash") == digest
            and (launch is None or handoff.get("launch") == launch)
        ):
            if "error" in handoff:
                raise RuntimeError(f"rank 0 failed between cascade stages: {handoff['error']}")
            return handoff
        if os.getppid() != parent:
            # Started by Lightning's ddp launcher from rank 0, which has exited.
            raise RuntimeError(f"rank 0 exited before writing {path}")
        return None

    # Rank 0 runs the cascade over the training persons: minutes on the full MPII.
    return wait_for_rank0(read, str(path), poll_s)
