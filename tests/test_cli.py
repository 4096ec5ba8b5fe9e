"""datamodules/cli.py: every tool composes conf/<name>.yaml with Hydra, answers --help and
--cfg job, keeps the working directory, and ends a fixable error as one paragraph."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import yaml
from cfg_utils import CONF, ROOT
from omegaconf import OmegaConf

from datamodules.cli import command, compose

#: module -> its primary config
COMMANDS = {
    "experiments.predict": "predict",
    "experiments.export": "export",
    "experiments.box_prompt": "box_prompt",
    "experiments.report": "report",
    "datamodules.check": "check",
}


def _run(module: str, args: list[str], monkeypatch, tmp_path) -> int:
    """The exit status of ``module``'s command line run in this process (Hydra reads sys.argv)
    from ``tmp_path``."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [module, *args])
    with pytest.raises(SystemExit) as stop:  # --help, --cfg and errors exit; a job returns
        importlib.import_module(module).main()
        sys.exit(0)
    return stop.value.code


@pytest.mark.parametrize("module", COMMANDS)
def test_help_lists_every_option(module):
    """The help text (hydra.help.template) names every key of the command's config. (Hydra's own
    --help adds listings of every conf/ group, a second per command: run once, below.)"""
    cfg = compose(COMMANDS[module], with_hydra=True)
    text = OmegaConf.select(cfg, "hydra.help.template").replace("$CONFIG", "")
    assert f"Usage: python -m {module} " in text
    keys = yaml.safe_load((CONF / f"{COMMANDS[module]}.yaml").read_text())
    for key in set(keys) - {"defaults", "hydra"}:
        assert f"  {key}=" in text, key


def test_cfg_job_prints_the_composition_with_run_py_groups(monkeypatch, tmp_path, capsys):
    args = ["--cfg", "job", "ckpt=a.ckpt", "input=0", "output=o", "eval=flip", "model=pspnet_lite"]
    assert _run("experiments.predict", args, monkeypatch, tmp_path) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    run_eval = OmegaConf.to_container(compose("run", ["eval=flip"]).eval)
    assert cfg["eval"] == run_eval and cfg["eval"]["flip"] is True
    assert cfg["model"]["_target_"] == "lightning_modules.nets.PSPNet" and cfg["input"] == 0
    assert (
        _run(
            "datamodules.check", ["--cfg", "job", "data=lip", "data.root=/d"], monkeypatch, tmp_path
        )
        == 0
    )
    data = yaml.safe_load(capsys.readouterr().out)["data"]
    assert data["_target_"] == "datamodules.lip.LIPDataModule" and data["root"] == "/d"
    assert list(tmp_path.iterdir()) == []


def test_predict_options_say_which_groups_were_chosen():
    from experiments.predict import options

    def opts(args):
        return command("predict", lambda cfg: options(cfg, ()))(args)

    plain = opts([])
    assert (
        plain["model"] is plain["data"] is plain["eval_config"] is plain["eval_overrides"] is None
    )
    # no group chosen: +eval.<key> overrides the checkpoint's own protocol
    assert opts(["+eval.flip=true"])["eval_overrides"] == {"flip": True}
    chosen = opts(["eval=ms_flip", "eval.scales=[1.0,0.5]", "model=pspnet_lite", "data=lip"])
    assert list(chosen["eval_config"].scales) == [1.0, 0.5] and chosen["eval_overrides"] is None
    assert chosen["model"].backbone == "lite" and chosen["data"].num_classes == 20


def test_compose_inside_another_hydra_context_restores_it():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        assert compose(None, ["+data=lip"]).data.num_classes == 20
        assert hydra_compose("run", ["data=atr"]).data.num_classes == 18
    assert not GlobalHydra.instance().is_initialized()


@pytest.mark.parametrize(
    ("module", "args", "message"),
    [
        (
            "experiments.report",
            ["sweep={tmp}/none"],
            "ConfigError: sweep={tmp}/none: no such folder",
        ),
        ("experiments.box_prompt", ["ckpt=c", "image=i", "output=o"], "ConfigError: give boxes="),
        ("experiments.predict", ["input=0", "output=o"], "PredictError: missing ckpt=..."),
        (
            "experiments.export",
            ["ckpt=c", "output=o.onnx", "+model.layers=[1,1,1,1]"],
            "PredictError: model.layers given without model=<conf/model name>",
        ),
        (
            "experiments.predict",
            ["ckpt=c", "input=i", "output=o", "+data.num_classes=20", "+data.eval_size=[9,9]"],
            "PredictError: data.num_classes, data.eval_size given without data=<conf/data name>",
        ),
    ],
)
def test_fixable_errors_are_one_paragraph(module, args, message, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    assert _run(module, [a.format(tmp=tmp_path) for a in args], monkeypatch, tmp_path) == 1
    err = capsys.readouterr().err
    assert err.startswith(message.format(tmp=tmp_path)) and err.count("\n") == 1, err


def test_python_m_predict_help_exits_0_and_writes_nothing(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.predict", "--help"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "  ckpt=<file>" in proc.stdout and "  eval=<name>" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # no outputs/ run folder, no .hydra, no log file
