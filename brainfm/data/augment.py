"""MONAI augmentations for shard samples, reproducible per sample.

Each sample's transforms are re-seeded from (seed, epoch, position) before they run, so an augmented epoch is
the same whichever worker produced it and a resumed run sees exactly the augmentations it would have seen.
Spatial transforms move image, mask, anatomy priors and label together (nearest-neighbour for the binary ones).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from monai.transforms import Compose, RandAdjustContrastd, RandAffined, RandBiasFieldd, RandGaussianNoised

from brainfm.config import ReaderConfig

_SPATIAL_KEYS = ("image", "mask", "anatomy", "label")
_MODES = {"image": "bilinear", "mask": "nearest", "anatomy": "bilinear", "label": "nearest"}


def build_augmenter(config: ReaderConfig, spatial_dims: int) -> Callable[[dict[str, Any], int], dict[str, Any]]:
    """Return ``augment(item, seed) -> item`` for channel-first tensors of ``spatial_dims`` dimensions."""
    rotate = config.rotate_degrees * torch.pi / 180.0
    rotate_range = (rotate,) if spatial_dims == 2 else (rotate, rotate, rotate)
    pipelines: dict[tuple[str, ...], Compose] = {}

    def compose_for(keys: tuple[str, ...]) -> Compose:
        if keys not in pipelines:
            transforms = []
            if config.affine_prob > 0:
                transforms.append(
                    RandAffined(
                        keys=list(keys),
                        mode=[_MODES[k] for k in keys],
                        prob=config.affine_prob,
                        rotate_range=rotate_range,
                        scale_range=(config.scale_fraction,) * spatial_dims,
                        translate_range=(config.translate_voxels,) * spatial_dims,
                        padding_mode="zeros",
                    )
                )
            if config.bias_field_prob > 0:
                transforms.append(
                    RandBiasFieldd(keys="image", prob=config.bias_field_prob, coeff_range=(0.0, config.bias_field_coeff))
                )
            if config.noise_prob > 0:
                transforms.append(RandGaussianNoised(keys="image", prob=config.noise_prob, std=config.noise_std))
            if config.contrast_prob > 0:
                transforms.append(RandAdjustContrastd(keys="image", prob=config.contrast_prob, gamma=config.contrast_gamma))
            pipelines[keys] = Compose(transforms)
        return pipelines[keys]

    def augment(item: dict[str, Any], seed: int) -> dict[str, Any]:
        keys = tuple(k for k in _SPATIAL_KEYS if k in item)
        pipeline = compose_for(keys)
        pipeline.set_random_state(seed=seed % (2**32))
        arrays = pipeline({k: item[k] for k in keys})
        out = dict(item)
        for k in keys:
            value = arrays[k]
            value = value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)
            out[k] = value.to(torch.float32).contiguous()
        if "mask" in out:
            out["mask"] = (out["mask"] > 0.5).to(torch.float32)
        return out

    return augment
