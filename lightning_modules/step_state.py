"""Training-step numbers kept on the device and read by the host every few steps.

A training step that converts a tensor to a Python value (``float(loss)``, ``bool(isfinite)``, a
progress bar's ``.item()``) makes the host wait until the accelerator has finished every queued
kernel: the host can no longer prepare the next step while the current one runs. A step here only
appends its stacked loss terms to :class:`StepLog` (no kernel beyond making them); a read adds
the norm of the weights after the last update (:func:`norm_sum`), and :meth:`StepLog.read` hands
the host everything since the last read in one transfer and finds there the first non-finite
loss, or non-finite weights, which the module does every ``trainer.log_every_n_steps`` steps, at
the end of each epoch and before every checkpoint.

The weights, not each step's gradients, are what is checked. An update with a non-finite gradient
makes them non-finite (SGD, Adam, AdamW and clipping by norm all pass a NaN or inf on; clipping
by value clamps an inf to its bound), and so the next step's loss too; a step that fp16's
``GradScaler`` skips for its inf gradients (a normal event of ``precision=16-mixed``) leaves them
finite and stops nothing; and the check reads every weight once per read instead of every
gradient once per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

#: What a :class:`StepLog` found first: a non-finite loss, or non-finite weights.
LOSS, WEIGHTS = 0, 1


def stack_terms(losses: dict[str, Tensor]) -> Tensor:
    """The loss terms as one ``(T,)`` float32 tensor, detached, in ``losses``' order."""
    return torch.stack([v.detach().float().reshape(()) for v in losses.values()])


def norm_sum(tensors: list[Tensor]) -> Tensor:
    """A ``()`` float32 tensor on the tensors' device, non-finite iff an entry of ``tensors`` is.

    The sum of the per-tensor 2-norms (NaN or inf when an entry is, or when its squares overflow
    float32, |w| > 1e19, which no converging run produces): one multi-tensor reduction (a fused
    kernel on GPUs, a C++ loop on CPUs) and one sum, no host sync. Element-wise ``isfinite`` per
    tensor costs about 10x more on a CPU, the max-norm about 2x.
    """
    return torch.stack(torch._foreach_norm(tensors)).float().sum()


def is_last_train_batch(trainer: Any, batch_idx: int) -> bool:
    """Whether ``batch_idx`` is the last training batch of the epoch: the count Lightning plans
    (``limit_train_batches`` included) or, for a loader without a length, its fetcher's end."""
    last = batch_idx + 1 >= trainer.num_training_batches
    return bool(last or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)


def read_points(trainer: Any, batch_idx: int) -> tuple[bool, bool]:
    """``(read, log)`` for a module's ``on_train_batch_end`` at ``batch_idx``: ``log`` at the
    steps where Lightning writes step metrics (``log_every_n_steps``; a value logged at another
    step would be written as if it belonged to the next logging step), ``read`` then and at an
    epoch's last batch too (validation and checkpoints come next, and must never see weights
    that a non-finite step produced)."""
    log = bool(trainer._logger_connector.should_update_logs)
    return log or is_last_train_batch(trainer, batch_idx), log


@dataclass(frozen=True)
class NonFinite:
    """The first non-finite step of a read: its global step, kind (``LOSS``, or ``WEIGHTS``:
    the weights after that step's update) and the loss terms of that step, ``{name: value}``."""

    step: int
    kind: int
    terms: dict[str, float]


class StepLog:
    """Each step's loss terms and, at a read, the weights' norm, on the device until :meth:`read`.

    The epoch mean of a term is ``sum_s B_s x_s / sum_s B_s`` over the steps ``s`` that produced
    it, as Lightning's ``self.log(..., on_epoch=True, batch_size=B)`` computes it; it is summed on
    the host, in float64, from the values each read brings. Terms are grouped by the tuple of
    names a step produced (a loss may add a term from some epoch on).
    """

    def __init__(self) -> None:
        self.names: tuple[str, ...] = ()
        # Since the last read: (global step, names, batch size, (T,) terms), (global step, ())
        self._terms: list[tuple[int, tuple[str, ...], int, Tensor]] = []
        self._weights: list[tuple[int, Tensor]] = []
        self.last: dict[str, float] = {}  # the terms of the last step read
        # whether the weights' norm of the last read was finite (None: that read had none)
        self.weights_finite: bool | None = None
        self._sums: dict[str, list[float]] = {}  # name -> [sum of B * x, sum of B]

    def add_terms(self, step: int, names: tuple[str, ...], terms: Tensor, batch_size: int) -> None:
        """Keeps one step's ``(T,)`` ``terms`` (named ``names``) of a batch of ``batch_size``."""
        self.names = names
        self._terms.append((step, names, batch_size, terms))

    def add_weights_norm(self, step: int, norm: Tensor) -> None:
        """Keeps the ``()`` :func:`norm_sum` of the weights after the update of ``step``."""
        self._weights.append((step, norm))

    @property
    def pending(self) -> bool:
        """Whether a step was kept since the last :meth:`read`."""
        return bool(self._terms or self._weights)

    @property
    def last_step(self) -> int | None:
        """The global step of the last terms kept since the last :meth:`read` (None: none)."""
        return self._terms[-1][0] if self._terms else None

    def read(self) -> NonFinite | None:
        """Brings every kept value to the host in one transfer, adds the terms to the epoch sums,
        sets :attr:`last`, and returns the first non-finite loss or weights (None: all finite)."""
        if not self.pending:
            return None
        parts = [t for _, _, _, t in self._terms] + [n.reshape(1) for _, n in self._weights]
        flat = torch.cat([p.to(torch.float64) for p in parts]).cpu().tolist()
        events: list[tuple[int, int, dict[str, float]]] = []
        offset, step_terms = 0, {}
        for step, names, batch_size, terms in self._terms:
            values = flat[offset : offset + terms.numel()]
            offset += terms.numel()
            named = dict(zip(names, values, strict=True))
            step_terms[step] = named
            if not all(math.isfinite(v) for v in values):
                events.append((step, LOSS, named))
            for name, value in named.items():
                acc = self._sums.setdefault(name, [0.0, 0.0])
                acc[0] += batch_size * value
                acc[1] += batch_size
        self.weights_finite = None
        for (step, _), value in zip(self._weights, flat[offset:], strict=True):
            self.weights_finite = math.isfinite(value)
            if not self.weights_finite:
                events.append((step, WEIGHTS, step_terms.get(step, {})))
        if self._terms:
            self.last = dict(step_terms[self._terms[-1][0]])
        self._terms, self._weights = [], []
        if not events:
            return None
        # A loss before the weights its step's update made.
        step, kind, terms = min(events, key=lambda e: (e[0], e[1]))
        return NonFinite(step, kind, terms)

    def epoch_means(self) -> dict[str, float]:
        """``{name: epoch mean}`` of every term read since the last :meth:`reset`."""
        return {name: s / n for name, (s, n) in self._sums.items() if n > 0}

    def reset(self) -> None:
        """Forgets the epoch sums (and anything not read yet)."""
        self._terms, self._weights, self._sums = [], [], {}


# ---------------------------------------------------------------------- reading a StepLog in a module


def format_terms(terms: dict[str, float]) -> str:
    """``{name: value}`` as ``"loss=nan, loss/l2=inf"`` (4 significant digits)."""
    return ", ".join(f"{name}={value:.4g}" for name, value in terms.items())


def gather_nonfinite(
    module: Any, event: NonFinite | None, names: tuple[str, ...]
) -> list[tuple[int, NonFinite]]:
    """Every process's finding of one :meth:`StepLog.read`, the same list on every rank.

    Under DDP each rank's ``(2 + T,)`` float64 row ``[step, kind, *terms]`` (``-1`` first for
    "all finite"; the terms in ``names``' order, NaN where the step lacked one) is gathered with
    one ``module.all_gather``, so that every rank stops in the same read with the same message
    (a rank stopping alone would leave the others waiting in the next collective). Every rank
    must call it at the same read.

    Args:
        module: the LightningModule (its ``trainer.world_size``, ``device``, ``all_gather``).
        event: this process's finding (None: all finite).
        names: the ``T`` term names of the rows.

    Returns:
        ``[(rank, finding)]`` of the ranks that found a non-finite step (empty: none did).
    """
    trainer = getattr(module, "_trainer", None)
    world_size = trainer.world_size if trainer is not None else 1
    if world_size <= 1:
        return [] if event is None else [(0, event)]
    if event is None:
        row = torch.full((2 + len(names),), -1.0, dtype=torch.float64)
    else:
        terms = [event.terms.get(name, math.nan) for name in names]
        row = torch.tensor([float(event.step), float(event.kind), *terms], dtype=torch.float64)
    rows = module.all_gather(row.to(module.device)).reshape(world_size, -1).cpu().tolist()
    return [
        (rank, NonFinite(int(r[0]), int(r[1]), dict(zip(names, r[2:], strict=True))))
        for rank, r in enumerate(rows)
        if r[0] >= 0
    ]


def first_nonfinite(found: list[tuple[int, NonFinite]], world_size: int) -> tuple[NonFinite, str]:
    """The first finding of :func:`gather_nonfinite` (earliest step, a loss before the weights)
    and its loss terms as text: the terms alone in one process; under DDP those of each rank
    that found it (4 at most) for a loss, their mean for the weights (the same on every
    rank)."""
    step, kind = min((e.step, e.kind) for _, e in found)
    rows = [(rank, e.terms) for rank, e in found if (e.step, e.kind) == (step, kind)]
    if world_size <= 1:
        text = format_terms(rows[0][1])
    elif kind == LOSS:
        text = "; ".join(f"rank {rank}: {format_terms(terms)}" for rank, terms in rows[:4])
    else:
        names = list(rows[0][1])
        mean = {n: sum(t.get(n, math.nan) for _, t in rows) / len(rows) for n in names}
        text = f"{format_terms(mean)} (mean over {len(rows)} processes)"
    return NonFinite(step, kind, dict(rows[0][1])), text


def log_step_terms(trainer: Any, terms: dict[str, float], prefix: str = "train/") -> None:
    """Writes one logger row ``{prefix}<name>_step`` of ``terms`` at the trainer's logging step,
    as Lightning writes ``self.log(..., on_step=True, on_epoch=True)`` values. Host floats go
    straight to the loggers: a tensor given to ``self.log`` would stay in Lightning's results,
    updated with small kernels every step."""
    trainer._logger_connector.log_metrics({f"{prefix}{k}_step": v for k, v in terms.items()})


def read_step_log(
    module: Any, step_log: StepLog, log: bool, prefix: str = "train/", check: bool = True
) -> tuple[NonFinite, str] | None:
    """Reads ``step_log`` (one host transfer; under DDP one ``all_gather`` more), and either
    returns the first non-finite step of any rank with its terms as text (:func:`first_nonfinite`,
    for the module to raise its own error; nothing is logged then), or, with ``log``, writes the
    last step's terms as ``{prefix}<name>_step`` (:func:`log_step_terms`). ``check=False`` reads
    and logs without looking for a non-finite step (and without the gather).

    Call it on every rank at the same points (every ``log_every_n_steps`` steps, an epoch's last
    batch, its end, a checkpoint); a read with nothing kept since the last one does nothing (the
    ranks keep their steps together).
    """
    if not step_log.pending:
        return None
    names = step_log.names
    event = step_log.read()
    found = gather_nonfinite(module, event, names) if check else []
    if found:
        trainer = getattr(module, "_trainer", None)
        return first_nonfinite(found, trainer.world_size if trainer is not None else 1)
    if log:
        log_step_terms(module.trainer, step_log.last, prefix)
    return None


def log_epoch_means(
    module: Any, step_log: StepLog, prefix: str = "train/", prog_bar: tuple[str, ...] = ()
) -> None:
    """Logs each term's batch-weighted epoch mean (:meth:`StepLog.epoch_means`) as
    ``{prefix}<name>_epoch`` through ``module.log`` (from ``on_train_epoch_end``: written with
    Lightning's other epoch metrics, seen by checkpoint monitors), then resets the sums; the
    terms named in ``prog_bar`` go to the progress bar too."""
    for name, mean in step_log.epoch_means().items():
        module.log(
            f"{prefix}{name}_epoch",
            torch.tensor(mean),  # float32, as Lightning's own epoch mean
            on_step=False,
            on_epoch=True,
            prog_bar=name in prog_bar,
            batch_size=1,
        )
    step_log.reset()
