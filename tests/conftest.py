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


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread_per_session():
    """Test tensors are tiny: one intra-op thread is faster, and on a loaded 2-core box two threads per process
    thrash (measured: 0.1 s vs 2-20 s per tiny UNet train step). Session scope, so the module- and session-scoped
    fixtures (built before any function-scoped one) train and reconstruct on one thread too: the study fixture
    took 258 s with the default two threads and 53 s with one. Subprocess launches set their own OMP_NUM_THREADS."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Back to one thread before each test, whatever a fixture or an earlier test left behind."""
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


# ------------------------------------------------------------------------------- a tiny calibrated model folder
# Shared by tests/test_hub.py and tests/test_pipeline.py (fixtures, so no test module imports another).
TINY_RECIPE = {"spacing": (8.0, 8.0, 8.0), "shape": (24, 28, 24)}  # the MNI brain fits; tiny nets stay fast
TINY_SPLITS = {"train": ["sub-01", "sub-02", "sub-03"], "val": ["sub-04"]}


def _tiny_components() -> dict:
    """Tiny real brainfm networks (seeded) and a diffusers DDIM noise schedule."""
    from diffusers import DDIMScheduler

    from brainfm.models.conditioning import Conditioner
    from brainfm.models.unet import LatentUNet
    from brainfm.models.vae import BrainVAE

    torch.manual_seed(0)
    vae = BrainVAE(spatial_dims=2, channels=(8, 8), latent_channels=2, attention_levels=(False, False),
                   norm_num_groups=4, scaling_factor=0.8)
    conditioner = Conditioner(sites=("siteA", "siteB"), hidden_size=16, num_layers=1, num_heads=2,
                              cross_attention_dim=16)
    unet = LatentUNet(spatial_dims=2, latent_channels=2, anatomy_channels=3, channels=(8, 8),
                      attention_levels=(False, True), num_head_channels=8, cross_attention_dim=16, norm_num_groups=4)
    noise_scheduler = DDIMScheduler(num_train_timesteps=100, beta_schedule="scaled_linear", clip_sample=False)
    return {"vae": vae.eval(), "unet": unet.eval(), "conditioner": conditioner.eval(),
            "noise_scheduler": noise_scheduler}


def _tiny_residuals(n: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.zeros(TINY_RECIPE["shape"], dtype=bool)
    mask[4:20, 4:24, 4:20] = True
    return [np.abs(rng.normal(0.0, 0.1, mask.shape)).astype(np.float32) * mask for _ in range(n)], mask


def _tiny_calibration():
    """A real NormativeCalibration fitted on small healthy residual maps."""
    from brainfm.anomaly.normative import NormativeCalibration
    from brainfm.config import DeviationConfig

    residuals, mask = _tiny_residuals(4, seed=1)
    config = DeviationConfig(median_filter_size=3, mask_erosion_vox=1, min_component_vox=2, target_fpr=0.05)
    return NormativeCalibration.fit(residuals, [mask] * len(residuals), config)


def _write_tiny_evaluation(report_dir) -> dict:
    """metrics.json + report.md written by the evaluation module for a calibrated healthy/lesion test set."""
    import json

    from brainfm.evaluation.metrics import MetricAccumulator
    from brainfm.evaluation.report import write_report

    calibration = _tiny_calibration()
    accumulator = MetricAccumulator(threshold=calibration.threshold, size_bins_ml=(0.01,), pr_curve_points=20)
    residuals, mask = _tiny_residuals(4, seed=2)
    for i, residual in enumerate(residuals):
        label = None
        if i >= 2:  # two scans with a simulated hyperintense cube
            label = np.zeros(mask.shape, dtype=np.uint8)
            label[8:12, 8:12, 6 + i : 10 + i] = 1
            residual = residual + 0.6 * label
        result = calibration.analyse(residual, mask)
        accumulator.add(result.zmap, label if label is not None else np.zeros(mask.shape, np.uint8), mask,
                        pred_mask=result.mask, subject_score=result.subject_score,
                        lesion_type="simulated-tumour" if label is not None else None, voxel_volume_ml=0.008,
                        scan_id=f"scan-{i}")
    protocol = {**calibration.protocol(), "dataset": "demo-simulated", "spacing_mm": [2.0, 2.0, 2.0]}
    write_report(accumulator.compute(), protocol, report_dir)
    return json.loads((report_dir / "metrics.json").read_text())


def _write_tiny_index(folder):
    """A shard folder's index.json in the format of brainfm.data.writer (per-split counts by modality and
    dataset, modalities per split); no tar files: the card reads nothing else. sub-01 is the lesion subject,
    sub-03 is CT."""
    import json

    from brainfm.config import PreprocessConfig
    from brainfm.data.preprocess import recipe_dict
    from brainfm.data.writer import FORMAT

    folder.mkdir(parents=True)
    splits, counts = {}, {}
    for split, subjects in TINY_SPLITS.items():
        splits[split] = [{"name": f"{split}-000000.tar", "n_samples": len(subjects), "sha256": "-", "bytes": 0,
                          "keys": [f"{s}_0" for s in subjects], "slice_brain_voxels": [[1]] * len(subjects)}]
        datasets: dict[str, int] = {}
        modalities: dict[str, int] = {}
        for i, _ in enumerate(subjects):
            dataset = "brainfm-synth-lesion" if i == 0 and split == "train" else "brainfm-synth-healthy"
            modality = "T1" if i < 2 else "CT"
            datasets[dataset] = datasets.get(dataset, 0) + 1
            modalities[modality] = modalities.get(modality, 0) + 1
        counts[split] = {"n_samples": len(subjects), "n_shards": 1, "n_subjects": len(subjects),
                         "modalities": modalities, "datasets": datasets, "sites": {"unknown": len(subjects)}}
    (folder / "index.json").write_text(json.dumps({
        "format": FORMAT, "recipe": recipe_dict(PreprocessConfig(**TINY_RECIPE)), "grid_shape": [24, 28, 24],
        "modalities": {split: sorted(c["modalities"]) for split, c in counts.items()}, "counts": counts,
        "splits": splits, "n_rejected": 0,
    }))
    return folder


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory) -> dict:
    """A calibrated model folder written by ``BrainFMPipeline.save_pretrained``, its evaluation report and the
    shard index it was trained on. Tests that change the folder copy it first."""
    from brainfm.config import PreprocessConfig, ReconstructionConfig
    from brainfm.pipeline import BrainFMPipeline

    root = tmp_path_factory.mktemp("tiny-model")
    components = _tiny_components()
    pipeline = BrainFMPipeline(
        **components, recipe=PreprocessConfig(**TINY_RECIPE), modalities=["T1"],
        reconstruction=ReconstructionConfig(t_star=(0.3,), num_inference_steps=5, batch_size=64),
        provenance={"source_run": str(root / "run")},
    )
    pipeline.set_calibration(_tiny_calibration(), source="tiny healthy residuals", split="val")
    model_dir = pipeline.save_pretrained(root / "model")
    metrics = _write_tiny_evaluation(root / "report")
    return {"root": root, "model_dir": model_dir, "components": components, "metrics": metrics,
            "metrics_path": root / "report" / "metrics.json", "shards": _write_tiny_index(root / "shards"),
            "write_index": _write_tiny_index}


# ------------------------------------------------------------------------- a demo folder's cohort and shards
# The demo's training/evaluation settings: everything else in DemoSettings decides the cohort and its shards.
_NOT_DATA = ("dims", "pretrain_config", "vae_steps", "ldm_steps", "pretrain", "reconstruction", "deviation", "adapt",
             "adapt_steps")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """``demo_data(folder, settings)``: a demo folder's ``cohort/`` and ``shards/`` (the demo's own stage functions)
    copied into ``folder``, built once per session for each distinct set of the settings they depend on (every
    field but the training and evaluation ones). The 3D demo and the studies share one T1 cohort this way: its
    synthesis and preprocessing cost about 40 s on a loaded 2-core box. The demo and ``build_base`` then find
    both stages complete and skip them."""
    import json
    import shutil

    from brainfm.config import to_dict
    from brainfm.demo import make_context, stage_cohort, stage_shards

    built: dict[str, object] = {}

    def prepare(folder, settings) -> None:
        key = json.dumps({k: v for k, v in to_dict(settings).items() if k not in _NOT_DATA}, sort_keys=True)
        if key not in built:
            source = make_context(tmp_path_factory.mktemp("demo-data"), settings)
            stage_cohort(source)
            stage_shards(source)
            built[key] = source.out
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("cohort", "shards"):
            shutil.copytree(built[key] / name, folder / name)

    return prepare
