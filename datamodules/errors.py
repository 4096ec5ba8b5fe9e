"""The errors a user can fix, and the one rule by which every rimlab command reports them.

It lives in ``datamodules``, the package that ``run.py``, ``experiments/``, ``lightning_modules/``
and ``datamodules.check`` may all import, so that every command shares it: a missing dataset
folder, a bad config value or an unreadable checkpoint ends the command with one paragraph (what,
which file or key, what to do) and exit status 1 instead of a traceback, which
``HYDRA_FULL_ERROR=1`` (or the caller's debug switch) shows again. Every other exception keeps its
traceback: it is a bug, not a mistake in the input.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class FixableError(Exception):
    """Base of the errors that describe a mistake in the input (a dataset file, a config value, a
    checkpoint): :func:`run_command` prints them as one paragraph with exit status 1."""


class ConfigError(FixableError, ValueError):
    """A configuration that cannot work, caught before any data is read."""


class MissingPackageError(FixableError, ImportError):
    """An optional package that a dataset or option needs is not installed."""


#: Optional packages: import name -> (requirement, pyproject extra that installs it).
OPTIONAL_PACKAGES: dict[str, tuple[str, str]] = {
    "cityscapesscripts": ("cityscapesscripts>=2.2", "cityscapes"),
    "h5py": ("h5py>=3.10", "nyudv2"),
    "pycocotools": ("pycocotools>=2.0", "coco"),
    "tensorboard": ("tensorboard>=2.15", "tensorboard"),
}


def require(package: str, purpose: str) -> None:
    """Imports the optional ``package`` (a module of a key of :data:`OPTIONAL_PACKAGES`) or says
    how to get it.

    Raises:
        MissingPackageError: the package is not importable; the message names ``purpose``, the
            extra that installs it and the requirement.
    """
    import importlib

    requirement, extra = OPTIONAL_PACKAGES[package.split(".")[0]]
    try:
        importlib.import_module(package)
    except ImportError as err:
        raise MissingPackageError(
            f"{purpose} needs the {package.split('.')[0]} package, which is not installed ({err}): "
            f"pip install -e '.[{extra}]' in the rimlab checkout, or pip install '{requirement}'"
        ) from err


def run_command(
    entry: Callable[[], T], *, traceback: bool = False, log: logging.Logger | None = None
) -> T:
    """Runs a command's ``entry()``; a :class:`FixableError` ends the process cleanly.

    Args:
        entry: the command's body.
        traceback: re-raise fixable errors too (a debug preset); ``HYDRA_FULL_ERROR=1`` does the
            same for every command.
        log: where the paragraph goes (a Hydra job's logger also writes it to the run's log
            file); None prints it to stderr.

    Returns:
        What ``entry()`` returned.

    Raises:
        SystemExit: with status 1, after a fixable error was reported.
    """
    try:
        return entry()
    except Exception as caught:
        # hydra.utils.instantiate wraps what a constructor raises in an InstantiationException
        err = caught if isinstance(caught, FixableError) else caught.__cause__
        if not isinstance(err, FixableError):
            raise
        if traceback or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        # One paragraph: a message that quotes a multi-line cause stays one block of text.
        message = f"{type(err).__name__}: {' '.join(str(err).split())}"
        if log is not None:
            log.error("%s", message)
        else:
            print(message, file=sys.stderr)
        sys.exit(1)
