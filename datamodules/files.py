"""Writing files so that a killed process or a concurrent reader never sees half of one.

Every layer writes through these helpers (checkpoints, scores, caches, hand-off records), so the
rule lives in one place: the bytes go to a hidden temporary file in the target's folder and only a
complete file is renamed onto the target (``os.replace`` is atomic on POSIX within one file
system).
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path, *, fsync: bool = False) -> Iterator[Path]:
    """Yields a temporary path to write; on a normal exit it replaces ``path``, else it vanishes.

    The temporary name keeps ``path``'s suffix, so writers that append one (``np.save``) or pick
    a format from it (``PIL``) behave as with the target. The target's folder is created.

    Args:
        path: the file to create or replace.
        fsync: flush the file to disk before the rename (checkpoints: a power cut must not leave an
            empty file under the final name).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name, created with the mode a plain open() gives (0666 less the umask; mkstemp's
    # 0600 would make every written file private to its owner).
    tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(8)}{path.suffix}"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: bytes | str, *, fsync: bool = False) -> None:
    """Writes ``data`` (text as UTF-8) to ``path`` all at once (see :func:`atomic_path`)."""
    payload = data.encode() if isinstance(data, str) else data
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(payload)


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None`` (JSON has no NaN or infinity)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def write_json(
    path: str | Path, obj: Any, *, indent: int | None = None, keep_nan: bool = False
) -> None:
    """Writes ``obj`` as JSON atomically.

    Args:
        path: the target file.
        obj: JSON-serialisable data.
        indent: as in ``json.dumps``.
        keep_nan: write NaN as Python's ``NaN`` token (for files only rimlab reads back, where a
            rank must see the very values rank 0 used); by default non-finite floats become
            ``null`` so that any JSON reader accepts the file.
    """
    text = json.dumps(obj if keep_nan else json_safe(obj), indent=indent)
    atomic_write(path, text)
