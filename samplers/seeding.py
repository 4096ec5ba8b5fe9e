"""Seeds derived from a run's seed and its position (epoch, rank, sample): the basis of exact resume."""

from __future__ import annotations

import numpy as np


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, epoch, rank, index ...), well spread.

    ``np.random.SeedSequence`` hashes the whole tuple, so nearby inputs (epoch 3 vs 4, seed 42
    vs 43) give unrelated streams, unlike ``seed + epoch``.
    """
    return int(np.random.SeedSequence([int(p) % 2**64 for p in parts]).generate_state(1)[0]) >> 1
