"""Shared pytest hooks and fixtures; the writers of tiny data sets are in ``tests/fixtures/``."""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures.mhp import make_mhp

#: Third-party warnings judged benign for tiny CPU test runs, by message. Everything else is shown,
#: and rimlab's own DeprecationWarnings fail under ``pytest -W error::DeprecationWarning``: these
#: are added to every test as ``filterwarnings`` marks, which take precedence over ``-W``.
BENIGN_WARNINGS = (
    # lightning's pytree helper on torch >= 2.10 (a FutureWarning from torch)
    r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning",
    # tests load data in the main process on purpose (num_workers=0)
    r"ignore:The '\w+_dataloader' does not have many workers:UserWarning",
    # tiny epochs have fewer batches than log_every_n_steps
    r"ignore:The number of training batches \(\d+\) is smaller than the logging interval:UserWarning",
    # rimlab logs epoch-level scores computed from metrics already summed over the ranks
    r"ignore:It is recommended to use `self.log\(.*sync_dist=True\)`:UserWarning",
    # resumed and repeated runs write into their own folders again
    r"ignore:Checkpoint directory .* exists and is not empty:UserWarning",
    r"ignore:Experiment logs directory .* exists and is not empty:UserWarning",
    # RIM stage 2 trains with the frozen encoder (BatchNorm included) in eval mode on purpose
    r"ignore:Found \d+ module\(s\) in eval mode at the start of training:UserWarning",
    # ParsingLitModule normalises uint8 batches in its own on_after_batch_transfer on purpose
    r"ignore:You have overridden `on_after_batch_transfer` in `LightningModule`:UserWarning",
    # one CPU device in tests
    r"ignore:GPU available but not used:UserWarning",
    r"ignore:The `srun` command is available on your system but is not used:UserWarning",
    # pycocotools' compiled mask code calls np.array(copy=False) under numpy 2
    r"ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    import torch

    no_gpu = pytest.mark.skip(reason="needs a CUDA device (bench/device_check.sh runs it)")
    for item in items:
        for spec in BENIGN_WARNINGS:
            item.add_marker(pytest.mark.filterwarnings(spec))
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)


@pytest.fixture
def mhp_root(tmp_path: Path) -> Path:
    """A valid miniature LV-MHP-v2 (:func:`fixtures.mhp.make_mhp`)."""
    return make_mhp(tmp_path / "LV-MHP-v2")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a test module: on a small shared CPU, more threads than free cores
    make small convolutions many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_host_sync():
    """Inside ``with no_host_sync():`` any tensor -> host conversion raises (``.item()``,
    ``.cpu()``, ``.tolist()``, ``bool(t)``, ...), and so does every operation whose output size
    depends on the values (``nonzero``, ``torch.where(cond)``, boolean-mask indexing,
    ``masked_select``, ``unique``): on an accelerator each is a device sync."""
    import contextlib

    import torch

    def refuse_call(name):
        def refuse(*args, **kwargs):
            raise AssertionError(f"host sync: {name}")

        return refuse

    def is_mask(index) -> bool:
        parts = index if isinstance(index, tuple) else (index,)
        return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)

    @contextlib.contextmanager
    def guard():
        getitem, where = torch.Tensor.__getitem__, torch.where

        def checked_getitem(self, index):
            if is_mask(index):
                raise AssertionError("host sync: boolean-mask indexing")
            return getitem(self, index)

        def checked_where(condition, *args, **kwargs):
            if not args and not kwargs:
                raise AssertionError("host sync: torch.where(condition)")
            return where(condition, *args, **kwargs)

        with pytest.MonkeyPatch.context() as mp:
            for name in ("cpu", "numpy", "item", "tolist", "__bool__", "__float__", "__int__"):
                mp.setattr(torch.Tensor, name, refuse_call(f"Tensor.{name}"))
            for name in ("nonzero", "masked_select", "unique"):
                mp.setattr(torch.Tensor, name, refuse_call(f"Tensor.{name}"))
                mp.setattr(torch, name, refuse_call(f"torch.{name}"))
            mp.setattr(torch.Tensor, "__getitem__", checked_getitem)
            mp.setattr(torch, "where", checked_where)
            yield

    return guard
