"""Exact resume of a Deep-MAC run: interrupted and resumed with resume=true equals an uninterrupted
run, weights and scores bit for bit."""

from __future__ import annotations

import json
import logging

import lightning.pytorch as pl
import pytest
import torch
from cfg_utils import compose_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EPOCHS, CRASH_EPOCH = 3, 2  # the interrupted run has finished epochs 0 and 1 (last.ckpt)
RUN = [
    "experiment=deepmac_quick",
    # 12 images, 2 held out for selection: 10 in batches of 4, the partial last batch is kept
    # (drop_last=False).
    "data.synthetic.num_train=12",
    "data.holdout=2",
    "data.synthetic.num_val=4",
    "data.synthetic.image_size=32",
    "data.image_size=32",
    "data.batch_size=4",
    # Loader workers persist across epochs (persistent_workers): anything they draw from their own
    # RNG continues the previous epochs' stream in one run but starts afresh after a resume.
    "data.num_workers=2",
    "model.mask_size=8",
    "model.fpn_channels=8",
    "model.head_channels=8",
    "model.embedding_hidden=8",
    f"schedule.total_epochs={EPOCHS}",
    "schedule.controls=[]",
    "trainer.deterministic=true",
    "logger=csv",
    "~callbacks.rich_progress_bar",
    "~callbacks.model_summary",
]


def _datamodule(tmp_path):
    import hydra

    dm = hydra.utils.instantiate(compose_cfg(RUN, tmp_path).data, _convert_="all")
    dm.prepare_data()
    return dm


def test_training_items_depend_on_the_sample_seed_only(tmp_path):
    """Training loads through EpochShuffleSampler; an (index, seed) item ignores torch's RNG."""
    from datamodules.base import EpochShuffleSampler

    dm = _datamodule(tmp_path)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, EpochShuffleSampler) and not loader.drop_last
    data = loader.dataset
    torch.manual_seed(0)
    a = data[(3, 12345)]
    torch.manual_seed(1)
    b = data[(3, 12345)]
    assert a["index"] == b["index"] == 3
    assert all(torch.equal(x, y) for x, y in zip(a["masks"], b["masks"], strict=True))
    assert torch.equal(a["image"], b["image"])
    # Seeds that flip and seeds that do not: the seed, not the index alone, fixes the item.
    images = {data[(3, s)]["image"].numpy().tobytes() for s in range(8)}
    assert len(images) == 2
    assert dm.val_dataloader().batch_size == 1


class Crash(RuntimeError):
    """The failure :class:`CrashAt` injects."""


class CrashAt(pl.Callback):
    """Raises :class:`Crash` before the first training batch of ``epoch`` (0-based)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == 0:
            raise Crash(f"injected at epoch {self.epoch}")


@pytest.fixture
def restore_determinism():
    # trainer.deterministic=true switches torch's global flag on for the rest of the process.
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def test_resumed_deepmac_run_equals_uninterrupted_run(tmp_path, restore_determinism, caplog):
    from run import run

    caplog.set_level(logging.INFO, logger="experiments.checkpoints")

    data = tmp_path / "data"
    expected = run(compose_cfg(RUN, tmp_path / "ref", data))

    crash = [
        f"+callbacks.crash._target_={__name__}.CrashAt",
        f"+callbacks.crash.epoch={CRASH_EPOCH}",
    ]
    with pytest.raises(Crash):
        run(compose_cfg([*RUN, *crash], tmp_path / "resumed", data))
    last = tmp_path / "resumed" / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["epoch"] == CRASH_EPOCH - 1
    got = run(compose_cfg([*RUN, "resume=true"], tmp_path / "resumed", data))
    # Not a fresh run (which would trivially equal the reference).
    assert f"resuming from {last}" in caplog.text

    # The final weights (evaluated by the driver) and the last checkpoint's state are identical.
    for name in ("final.ckpt", "checkpoints/last.ckpt"):
        a = torch.load(tmp_path / "resumed" / "run" / name, weights_only=False)["state_dict"]
        b = torch.load(tmp_path / "ref" / "run" / name, weights_only=False)["state_dict"]
        assert a.keys() == b.keys()
        for key in b:
            assert torch.equal(a[key], b[key]), f"{name}: {key}"
    # JSON text: NaN scores (no instance of a group) compare equal.
    for key in ("val", "val_detail"):
        assert json.dumps(got[key], sort_keys=True) == json.dumps(expected[key], sort_keys=True)
