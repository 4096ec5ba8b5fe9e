"""Fixable errors (dataset, config, checkpoint) end every command as one paragraph, exit status 1."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from cfg_utils import ROOT, SMALL_IMAGES, TINY
from omegaconf import OmegaConf
from torch import nn

from datamodules.batch import DatasetError
from datamodules.errors import ConfigError, FixableError, run_command
from experiments.predict import PredictError
from lightning_modules.checkpoint_io import CheckpointError, read_checkpoint
from lightning_modules.official_weights import OfficialCheckpointError, load_official_state
from lightning_modules.parsing import ParsingLitModule


def test_every_fixable_error_shares_one_base():
    for cls in (DatasetError, ConfigError, CheckpointError, OfficialCheckpointError, PredictError):
        assert issubclass(cls, FixableError), cls
    # Callers that caught the old bases still catch them.
    assert issubclass(CheckpointError, ValueError) and issubclass(PredictError, RuntimeError)


def test_run_command_prints_one_paragraph_and_exits_1(capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def fails() -> None:
        raise CheckpointError("/x/a.ckpt: cannot be read\n  (a cause on\n two lines)")

    with pytest.raises(SystemExit) as stop:
        run_command(fails)
    assert stop.value.code == 1
    assert capsys.readouterr().err == (
        "CheckpointError: /x/a.ckpt: cannot be read (a cause on two lines)\n"
    )
    assert run_command(lambda: 7) == 7

    def wrapped() -> None:  # what hydra.utils.instantiate makes of a constructor's error
        from hydra.errors import InstantiationException

        try:
            fails()
        except CheckpointError as err:
            raise InstantiationException("Error in call to target 'x.Y'") from err

    with pytest.raises(SystemExit):
        run_command(wrapped)
    assert capsys.readouterr().err.startswith("CheckpointError: /x/a.ckpt: cannot be read")
    with pytest.raises(KeyError):  # not a fixable error: its traceback stays
        run_command(lambda: {}["k"])
    with pytest.raises(CheckpointError):  # the debug switch re-raises
        run_command(fails, traceback=True)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(CheckpointError):
        run_command(fails)


def _tiny_module() -> ParsingLitModule:
    return ParsingLitModule(
        net=nn.Conv2d(3, 2, 1), loss=nn.Module(), optimizer=torch.optim.SGD, num_classes=2
    )


def test_checkpoint_readers_raise_checkpoint_errors_naming_the_file(tmp_path):
    missing, junk = tmp_path / "missing.ckpt", tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a zip file")
    module = _tiny_module()
    for read in (read_checkpoint, load_official_state, module.load_init_weights):
        with pytest.raises(CheckpointError, match=f"checkpoint not found: {missing}"):
            read(missing)
        with pytest.raises(CheckpointError, match=f"{junk}: cannot be read as a torch checkpoint"):
            read(junk)
    torch.save({"weights": torch.ones(2)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        module.load_init_weights(tmp_path / "plain.pt")
    torch.save({"state_dict": {"net.weight": torch.ones(5, 3, 1, 1)}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="does not match the configured model"):
        module.load_init_weights(tmp_path / "other.ckpt")


def _command(args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def _last_paragraph(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def test_predict_missing_checkpoint_is_one_paragraph(tmp_path, monkeypatch):
    from experiments import predict

    ckpt = tmp_path / "x.ckpt"
    args = [f"ckpt={ckpt}", f"input={tmp_path}", f"output={tmp_path / 'o'}"]
    paragraph = _last_paragraph(_command(["experiments.predict", *args]))
    assert paragraph == f"CheckpointError: checkpoint not found: {ckpt}"
    assert not (tmp_path / "o").exists()  # stopped before anything was written
    # HYDRA_FULL_ERROR=1 lets the error through, traceback and all (the same command line in
    # this process: raised instead of the paragraph and exit status 1)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["predict", *args])
    with pytest.raises(CheckpointError, match=f"checkpoint not found: {ckpt}"):
        predict.main()


def _in_process(main, args: list[str], monkeypatch, tmp_path, capsys) -> str:
    """The last stderr line of ``python -m <command> *args`` for a fixable error (exit status 1),
    run in this process as the command line (Hydra reads ``sys.argv``) from ``tmp_path``: the
    commands share ``datamodules.cli.command`` with predict, whose own test starts a process."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["command", *args])
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return captured.err.strip().splitlines()[-1]


def test_export_unreadable_checkpoint_is_one_paragraph(tmp_path, monkeypatch, capsys):
    from experiments import export

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    ckpt = tmp_path / "junk.ckpt"
    ckpt.write_bytes(b"PK\x03\x04 half a zip")  # a checkpoint cut short by a kill
    args = [f"ckpt={ckpt}", f"output={tmp_path / 'm.onnx'}"]
    paragraph = _in_process(export.main, args, monkeypatch, tmp_path, capsys)
    assert paragraph.startswith(f"CheckpointError: {ckpt}: cannot be read as a torch checkpoint")


def test_check_missing_dataset_folder_exits_1_without_traceback(tmp_path, monkeypatch, capsys):
    from datamodules import check

    root = tmp_path / "LIP"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["check", "data=lip", f"data.root={root}", "split=val"])
    assert check.main() == 1  # the exit status of python -m datamodules.check
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "Traceback" not in out and str(root) in " ".join(out.split())


@pytest.mark.parametrize(
    ("package", "call"),
    [
        ("cityscapesscripts", "cityscapes"),
        ("pycocotools", "coco"),
        ("h5py", "nyudv2"),
        ("tensorboard", "tensorboard"),
    ],
)
def test_a_missing_optional_package_names_its_extra(package, call, tmp_path, monkeypatch):
    """After a plain ``pip install -e .`` the option that needs a package says which extra."""
    from datamodules import cityscapes, coco_instances, nyudv2
    from datamodules.errors import OPTIONAL_PACKAGES, MissingPackageError

    for name in [package, *(m for m in sys.modules if m.startswith(f"{package}."))]:
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    cityscapes.cityscapes_labels.cache_clear()
    calls = {
        "cityscapes": cityscapes.cityscapes_labels,
        "coco": lambda: coco_instances._coco(tmp_path / "instances.json"),
        "nyudv2": lambda: nyudv2._open_h5(tmp_path / "nyu_depth_v2_labeled.mat"),
        "tensorboard": lambda: __import__("experiments.build").build.build_loggers(
            OmegaConf.create(
                {
                    "paths": {"output_dir": str(tmp_path)},
                    "logger": {
                        "tensorboard": {
                            "_target_": "lightning.pytorch.loggers.TensorBoardLogger",
                            "save_dir": str(tmp_path),
                        }
                    },
                }
            ),
            tmp_path,
        ),
    }
    with pytest.raises(MissingPackageError) as err:
        calls[call]()
    cityscapes.cityscapes_labels.cache_clear()
    requirement, extra = OPTIONAL_PACKAGES[package]
    assert isinstance(err.value, FixableError)
    assert f"pip install -e '.[{extra}]'" in str(err.value) and requirement in str(err.value)


@pytest.mark.slow
def test_the_quickstart_runs_without_the_optional_packages(tmp_path):
    """README command 1 installs no extra: the quickstart imports none of them."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT / "tests" / "without_extras"), str(ROOT / "tests")]
        ),
    }
    cmd = [
        sys.executable,
        str(ROOT / "run.py"),
        "experiment=quickstart",
        *TINY,
        *SMALL_IMAGES,
        "schedule.total_epochs=2",
        "schedule.stage1_epochs=1",
        "schedule.cpa_epoch=1",
        "schedule.baseline=false",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert (tmp_path / "run" / "results.json").is_file()
    probe = "import importlib, sys; importlib.import_module(sys.argv[1])"
    blocked = subprocess.run(
        [sys.executable, "-c", probe, "pycocotools"], env=env, capture_output=True, text=True
    )
    assert blocked.returncode != 0  # the blocker works, so the run above really lacked them
