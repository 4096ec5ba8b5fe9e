"""Training-step state kept on the device and read by the host every few steps.

A training step that converts a tensor to a Python value (``float(loss)``, ``bool(isfinite)``, a
progress bar's ``.item()``) makes the host wait until the accelerator has finished every queued
kernel: the host can no longer prepare the next step while the current one runs. These two
holders do their per-step work with tensor operations only; :meth:`StepTerms.read` hands the host
everything in one transfer, which the module does every ``trainer.log_every_n_steps`` steps, at
the end of each epoch and before every checkpoint.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: What a :class:`NonFiniteRecord` saw first: a non-finite loss, or a non-finite gradient.
LOSS, GRADIENT = 0, 1


def stack_terms(losses: dict[str, Tensor]) -> Tensor:
    """The loss terms as one ``(T,)`` float32 tensor, detached, in ``losses``' order."""
    return torch.stack([v.detach().float().reshape(()) for v in losses.values()])


class StepTerms:
    """The loss terms of the last step and their epoch sums weighted by batch size, on the device.

    The epoch mean of a term is ``sum_s B_s x_s / sum_s B_s`` over the steps ``s`` that produced
    it, as Lightning's ``self.log(..., on_epoch=True, batch_size=B)`` computes it. Terms are
    grouped by the tuple of names a step produced (a loss may add a term from some epoch on).
    """

    def __init__(self) -> None:
        self.names: tuple[str, ...] = ()
        self.last: Tensor | None = None
        # names -> ((T,) float64 sums of B * x, () float64 sum of B)
        self._sums: dict[tuple[str, ...], tuple[Tensor, Tensor]] = {}

    def update(self, names: tuple[str, ...], terms: Tensor, batch_size: int) -> None:
        """Adds one step's ``(T,)`` ``terms`` (named ``names``) of a batch of ``batch_size``."""
        self.names, self.last = names, terms
        sums = self._sums.get(names)
        if sums is None or sums[0].device != terms.device:
            sums = (
                terms.new_zeros(terms.shape, dtype=torch.float64),
                terms.new_zeros((), dtype=torch.float64),
            )
            self._sums[names] = sums
        sums[0].add_(terms, alpha=batch_size)
        sums[1].add_(batch_size)

    def epoch_means(self) -> dict[str, float]:
        """``{name: epoch mean}`` of every term seen since the last :meth:`reset` (one host read)."""
        if not self._sums:
            return {}
        groups = list(self._sums.items())
        flat = torch.cat([torch.cat([s, n.reshape(1)]) for _, (s, n) in groups]).tolist()
        totals: dict[str, list[float]] = {}
        offset = 0
        for names, _ in groups:
            count = flat[offset + len(names)]
            for i, name in enumerate(names):
                acc = totals.setdefault(name, [0.0, 0.0])
                acc[0] += flat[offset + i]
                acc[1] += count
            offset += len(names) + 1
        return {name: s / n for name, (s, n) in totals.items() if n > 0}

    def reset(self) -> None:
        self._sums = {}


class NonFiniteRecord:
    """The first step with a non-finite loss or gradient, and that step's loss terms, on the device.

    ``record`` costs two element-wise kernels and no host sync (the step number travels as a
    kernel argument); :meth:`state` returns everything as one ``(1 + T,)`` float64 tensor
    ``[2 * step + kind, *terms]`` (-1 first: nothing recorded), which the caller reads, or
    gathers from every process, when it checks.
    """

    def __init__(self) -> None:
        self._code: Tensor | None = None  # () float64: 2 * step + kind, -1 = nothing yet
        self._terms: Tensor | None = None  # (T,) float32

    def record(self, bad: Tensor, kind: int, step: int, terms: Tensor) -> None:
        """Remembers ``step``, ``kind`` and ``terms`` ``(T,)`` if ``bad`` (a bool scalar) holds
        and nothing was recorded before."""
        if self._code is None or self._terms is None or self._terms.shape != terms.shape:
            self._code = torch.full((), -1.0, dtype=torch.float64, device=terms.device)
            self._terms = torch.zeros_like(terms)
        first = bad & (self._code < 0)
        self._code = torch.where(first, float(2 * step + kind), self._code)
        self._terms = torch.where(first, terms, self._terms)

    def state(self, num_terms: int, device: torch.device) -> Tensor:
        """``(1 + T,)`` float64 ``[2 * step + kind, *terms]``; -1 first when nothing was recorded."""
        if self._code is None or self._terms is None or self._terms.numel() != num_terms:
            return torch.full((1 + num_terms,), -1.0, dtype=torch.float64, device=device)
        return torch.cat([self._code.reshape(1), self._terms.double()])

    def reset(self) -> None:
        self._code = self._terms = None


def decode(code: float) -> tuple[int, int] | None:
    """``(step, kind)`` of a :meth:`NonFiniteRecord.state` code, None for "nothing recorded"."""
    if code < 0:
        return None
    return int(code) // 2, int(code) % 2
