"""Writing files so that a killed process or a concurrent reader never sees half of one.

Every layer writes through these helpers (checkpoints, scores, caches, hand-off records, generated
data sets), so the rule lives in one place: the bytes go to a hidden temporary file (or folder) in
the target's folder and only a complete one is renamed onto the target (``os.replace`` and
``os.rename`` are atomic on POSIX within one file system).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
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
    # The writer's pid in the name lets remove_stale_temporaries tell a dead writer's leftover; the
    # file is created with the mode a plain open() gives (0666 less the umask; mkstemp's 0600 would
    # make every written file private to its owner).
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(8)}{path.suffix}"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Deletes the temporaries of ``path`` that :func:`atomic_path` writers killed mid-write left
    (those of live processes stay); returns the deleted paths."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        try:
            pid = int(tmp.name[len(path.name) + 6 :].split("-", 1)[0])
            os.kill(pid, 0)  # raises if no such process
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
        except (ValueError, PermissionError):
            continue  # not an atomic_path temporary, or another user's live process
    return removed


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


def _marker_matches(root: Path, marker: str, params: Mapping[str, Any]) -> bool:
    try:
        return json.loads((root / marker).read_text()) == params
    except (OSError, ValueError):
        return False


def generated_folder(
    root: str | Path, params: Mapping[str, Any], write: Callable[[Path], None], marker: str
) -> Path:
    """Makes ``root`` hold what ``write`` generates for ``params``, unless it already does.

    ``write(folder)`` fills a hidden temporary sibling of ``root``; the marker file recording
    ``params`` is written last and the folder is then renamed onto ``root``. So an interrupted
    generation leaves nothing under ``root`` (and a previous set intact), a set made with other
    parameters is replaced, and when another process finishes the same set first, its copy is
    kept and this one discarded.

    Args:
        root: the folder to generate.
        params: JSON-serialisable parameters; equal parameters must generate equal files.
        write: fills the folder it is given.
        marker: the marker file's name inside ``root``.

    Returns:
        ``root`` as a Path.

    Raises:
        FileExistsError: ``root`` is a non-empty folder without ``marker``; it is left alone (it
            may be a real data set).
    """
    root = Path(root)
    params = json.loads(json.dumps(params))  # as read back from the marker (tuples -> lists)
    if _marker_matches(root, marker, params):
        return root
    if root.exists() and not (root / marker).is_file() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists, is not empty and holds no {marker} marker")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.tmp-"))
    try:
        write(tmp)
        (tmp / marker).write_text(json.dumps(params, indent=1))  # last: the set is complete
        if _marker_matches(root, marker, params):  # another process finished it meanwhile
            return root
        old = None
        if root.exists():  # a set of other parameters (or an empty folder): moved aside
            old = root.with_name(f".{root.name}.old-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(root, old)
            except FileNotFoundError:  # another process moved it first
                old = None
        try:
            os.rename(tmp, root)
        except OSError:
            if not _marker_matches(root, marker, params):
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename, else discarded
    return root
