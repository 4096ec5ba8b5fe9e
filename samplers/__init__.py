"""Samplers that decide which pixels enter the loss (RIM's regionally balanced sampling).

Only torch is imported here, so the samplers can be unit-tested and reused outside Lightning.
"""

from __future__ import annotations

from samplers.regional import (
    RegionalBalancedSampler,
    class_pixel_accuracy,
    class_region_counts,
    expected_kept_share,
    keep_probabilities,
    sampling_statistics,
)

__all__ = [
    "RegionalBalancedSampler",
    "class_pixel_accuracy",
    "class_region_counts",
    "expected_kept_share",
    "keep_probabilities",
    "sampling_statistics",
]
