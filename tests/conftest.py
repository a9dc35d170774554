"""Shared fixtures: offline hub, deterministic CPU torch, and real template-derived data
(tiny 2D/3D batches cut from the ICBM152 template: T1 image; anatomy = brain mask + GM/WM-like maps)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


@pytest.fixture(scope="session")
def mni_t1_2mm():
    """The real ICBM152 2009a T1 template at 2 mm (nilearn ships it; no download)."""
    from nilearn.datasets import load_mni152_template

    return load_mni152_template(resolution=2)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    np.random.seed(0)
    yield


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Test tensors are tiny: one intra-op thread is faster, and on a loaded 2-core box two threads per process
    thrash (measured: 0.1 s vs 2-20 s per tiny UNet train step). Subprocess launches are unaffected."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def template_volumes(mni_t1_2mm) -> dict[str, torch.Tensor]:
    from nilearn.datasets import load_mni152_brain_mask

    def as_tensor(img) -> torch.Tensor:
        return torch.from_numpy(np.asarray(img.get_fdata(), dtype=np.float32))

    t1 = as_tensor(mni_t1_2mm)
    t1 = (t1 / torch.quantile(t1.flatten(), 0.995)).clamp(0, 1)
    mask = as_tensor(load_mni152_brain_mask(resolution=2))
    # tissue-prior stand-ins from the template's own contrast (nilearn's GM/WM templates cost ~3 s each to load)
    grey = mask * (1.0 - (t1 - 0.55).abs() / 0.2).clamp(0, 1)
    white = mask * ((t1 - 0.65) / 0.2).clamp(0, 1)
    return {"image": t1, "anatomy": torch.stack([mask, grey, white])}


def _batch(volumes: dict[str, torch.Tensor], spatial_dims: int) -> dict[str, torch.Tensor]:
    image, anatomy = volumes["image"][None], volumes["anatomy"]  # (1, X, Y, Z), (3, X, Y, Z)
    if spatial_dims == 2:
        stack = torch.cat([image, anatomy])  # axial slices 40 and 50: two different brains-worth of anatomy
        slices = torch.stack([stack[..., 40], stack[..., 50]])
        resized = F.interpolate(slices, size=(32, 32), mode="area")
    else:
        stack = torch.cat([image, anatomy])[None]
        volume = F.interpolate(stack, size=(16, 16, 16), mode="area")
        resized = torch.cat([volume, volume.flip(2)])  # second sample: left-right mirrored brain
    return {"image": resized[:, :1].contiguous(), "anatomy": resized[:, 1:].contiguous()}


@pytest.fixture(scope="session")
def brain_2d(template_volumes) -> dict[str, torch.Tensor]:
    return _batch(template_volumes, 2)


@pytest.fixture(scope="session")
def brain_3d(template_volumes) -> dict[str, torch.Tensor]:
    return _batch(template_volumes, 3)


@pytest.fixture(params=[2, 3], ids=["2d", "3d"])
def brain_batch(request, brain_2d, brain_3d) -> tuple[int, dict[str, torch.Tensor]]:
    return request.param, (brain_2d if request.param == 2 else brain_3d)


@pytest.fixture
def meta_records() -> list[dict]:
    """Reader-style per-sample metadata: nested and flat scalars, some fields missing."""
    return [
        {
            "modality": "T1",
            "sex": "F",
            "site": "unknown",
            "age": 34.0,
            "scalars": {"brain_volume_ml": 1210.0},
        },
        {"modality": "FLAIR", "sex": "M", "age": 71.0, "scalars": {"gm_fraction": 0.41, "wm_fraction": 0.36}},
    ]
