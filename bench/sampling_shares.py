"""What NRBS keeps of a training set under both sample counts (docs/rim.md, section 2).

    python bench/sampling_shares.py [hydra overrides, e.g. experiment=rim_pspnet data.root=...]

Composes the run config (default: ``experiment=quickstart``, the synthetic set, generated on first
use), reads the training set's cached per-class pixel and region counts and prints, for
``sampler.nrbs_count=pixels`` and ``regions`` with ``eta=min``, the spread of the counts and the
expected share of labelled training pixels the sampler keeps.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from experiments.build import build_datamodule
from samplers import expected_kept_share, keep_probabilities, sampling_statistics

CONF = Path(__file__).resolve().parents[1] / "conf"


def main(overrides: list[str]) -> dict[str, float]:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("run", overrides=overrides or ["experiment=quickstart"])
    datamodule = build_datamodule(cfg)
    pixels = torch.as_tensor(datamodule.class_pixel_counts()).double()
    regions = torch.as_tensor(datamodule.class_region_counts()).double()
    present = pixels > 0
    result = {
        "classes_present": int(present.sum()),
        "pixel_count_spread": float(pixels[present].max() / pixels[present].min()),
        "region_count_spread": float(regions[present].max() / regions[present].min()),
    }
    for count, kwargs in (
        ("pixels", {"pixel_counts": pixels}),
        ("regions", {"region_counts": regions}),
    ):
        probs = keep_probabilities(sampling_statistics("nrbs", nrbs_count=count, **kwargs))
        result[f"kept_share_{count}"] = expected_kept_share(probs, pixels)[0]
    print(f"classes present in the training set: {result['classes_present']}")
    for count in ("pixels", "regions"):
        print(
            f"nrbs_count={count:<7}  count spread (max / min) "
            f"{result[f'{count[:-1]}_count_spread']:>8.0f}x  expected kept share "
            f"{100 * result[f'kept_share_{count}']:.2f}% of the labelled pixels"
        )
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
