"""The command line of rimlab's tools, composed by Hydra as ``run.py``'s is.

``python -m experiments.predict``, ``experiments.export``, ``experiments.box_prompt``,
``experiments.report`` and ``datamodules.check`` each have a primary config ``conf/<name>.yaml``:
its keys are the command's options, and its defaults list reuses ``conf/``'s groups, so that
``model=``, ``data=`` and ``eval=`` select the same files as in ``run.py`` and ``data.root=``
overrides the same key. Hydra gives every command ``--help`` (the config's ``hydra.help``),
``--cfg job`` and the override grammar; ``conf/hydra/command.yaml`` keeps the working directory
and writes no run folder, config copy or log file. It lives in ``datamodules`` beside
:mod:`datamodules.errors` so that ``datamodules.check`` can use it too.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from omegaconf import DictConfig, open_dict

from datamodules.errors import run_command

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def compose(
    config_name: str | None, overrides: Sequence[str] = (), *, with_hydra: bool = False
) -> DictConfig:
    """``conf/<config_name>.yaml`` (None: an empty primary config) composed with ``overrides``, as
    the command line would; callable anywhere, inside a running Hydra app too (whose global state
    is restored afterwards).

    Args:
        config_name: a primary config of ``conf/``, or None (then select groups with
            ``+model=<name>``).
        overrides: Hydra overrides.
        with_hydra: keep the ``hydra`` node (for :class:`~hydra.core.hydra_config.HydraConfig`).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    # conf/paths/default.yaml roots every path at the checkout, wherever the command starts.
    os.environ.setdefault("RIMLAB_ROOT", str(ROOT))
    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return hydra_compose(
                config_name, overrides=list(overrides), return_hydra_config=with_hydra
            )
    finally:
        restore_gh_from_backup(backup)


def command(
    config_name: str, body: Callable[[DictConfig], T]
) -> Callable[[Sequence[str] | None], T | None]:
    """The entry point ``main(argv=None)`` of a tool whose options are ``conf/<config_name>.yaml``.

    ``main()`` is the command line: Hydra reads ``sys.argv`` (``--help``, ``--cfg job``,
    overrides) and runs ``body(cfg)``; a fixable error (a bad value, input, checkpoint or dataset)
    ends it as one paragraph with exit status 1 (:func:`datamodules.errors.run_command`;
    ``HYDRA_FULL_ERROR=1`` shows the traceback). ``main([...])`` composes the same config from a
    list of overrides and returns what ``body`` returns, errors raised (Python callers, tests).
    In both, ``HydraConfig.get()`` describes the composition (``runtime.choices``: the groups
    chosen).
    """

    def main(argv: Sequence[str] | None = None) -> T | None:
        if argv is not None:
            from hydra.core.hydra_config import HydraConfig

            cfg = compose(config_name, argv, with_hydra=True)
            HydraConfig.instance().set_config(cfg)
            with open_dict(cfg):
                del cfg.hydra
            return body(cfg)
        import hydra

        os.environ.setdefault("RIMLAB_ROOT", str(ROOT))
        results: list[T] = []

        @hydra.main(version_base="1.3", config_path=str(CONF), config_name=config_name)
        def app(cfg: DictConfig) -> None:
            results.append(run_command(lambda: body(cfg)))

        app()
        return results[0] if results else None

    main.__doc__ = f"Runs ``conf/{config_name}.yaml``'s command (see :func:`command`)."
    return main
