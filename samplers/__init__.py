"""Samplers that decide which pixels enter the loss (RIM's regionally balanced sampling).

Only torch is imported here, so the samplers can be unit-tested and reused outside Lightning.
The package re-exports exactly the public names of :mod:`samplers.regional` (its ``__all__``).
"""

from __future__ import annotations

from samplers import regional
from samplers.regional import *  # noqa: F403

__all__ = list(regional.__all__)
