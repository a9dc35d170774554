"""Seconds per volume: brainfm's latent pseudo-healthy reconstruction vs a pixel-space DDPM (AnoDDPM-style).

Both reconstruct the SAME preprocessed volume slice by slice (2D) from the SAME noise level: the baseline noises the
pixels to t = t* x T and runs the full step-by-step DDPM reverse chain (t UNet calls on 64x64 pixels, as AnoDDPM
does); brainfm noises the VAE latent to t* and runs a few DDIM steps on 16x16 latents, then decodes. Both are timed
in this process, on this machine, and the ratio is printed.

With ``--demo DIR`` (a finished ``brainfm demo`` folder) the trained model and the demo's simulated-lesion test
scans are used and the pooled voxel AUPRC of brainfm's z-maps is printed next to its time; the pixel DDPM is never
trained here, so it gets a time and no AUPRC. Without ``--demo`` both networks are untrained (timings only), sized
like ``configs/pretrain/demo-2d.yaml``, on a volume made from the real ICBM152 template.

    python benchmarks/detect_speed.py [--demo demo_out] [--volumes 2] [--threads 2] [--baseline-steps 25]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _untrained_model(tmp: Path):
    """A pipeline with the demo architecture and random weights, calibrated on nothing (timing only)."""
    from brainfm.config import DataConfig, PretrainConfig, load_config
    from brainfm.diffusion import make_scheduler
    from brainfm.models import BrainVAE, Conditioner, LatentUNet
    from brainfm.pipeline import BrainFMPipeline

    data = load_config(REPO / "configs/data/demo.yaml", DataConfig)
    pretrain = load_config(REPO / "configs/pretrain/demo-2d.yaml", PretrainConfig)
    torch.manual_seed(0)
    vae = BrainVAE(spatial_dims=2, **dict(pretrain.vae.network))
    unet = LatentUNet(spatial_dims=2, latent_channels=pretrain.vae.network.latent_channels,
                      anatomy_channels=1 + len(data.preprocess.tissue_priors), prediction_type=pretrain.ldm.prediction_type,
                      **dict(pretrain.ldm.unet))
    conditioner = Conditioner(**dict(pretrain.ldm.conditioner))
    scheduler = make_scheduler("ddpm", pretrain.ldm.num_train_timesteps, prediction_type=pretrain.ldm.prediction_type)
    from brainfm.config import DemoSettings

    reconstruction = DemoSettings().reconstruction
    return BrainFMPipeline(vae, unet, conditioner, scheduler, recipe=data.preprocess, modalities=["T1"],
                           reconstruction=reconstruction)


def _template_case(model, tmp: Path):
    """The ICBM152 template preprocessed with the model's recipe, with its anatomy conditioning."""
    import nibabel as nib
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    from brainfm.anomaly.evaluate import EvalCase

    t1, mask = load_mni152_template(resolution=2), load_mni152_brain_mask(resolution=2)
    nib.save(t1, tmp / "t1.nii.gz")
    nib.save(mask, tmp / "mask.nii.gz")
    prepared = model.prepare(tmp / "t1.nii.gz", "T1", tmp / "mask.nii.gz")
    scan = prepared.scan
    return EvalCase("icbm152", scan.image, scan.mask > 0, prepared.anatomy, prepared.meta, None, None,
                    prepared.voxel_volume_ml)


def _pixel_ddpm(model, t_star: float):
    """AnoDDPM-style pixel UNet (MONAI DiffusionModelUNet, no conditioning) and its DDPM schedule."""
    from monai.networks.nets import DiffusionModelUNet

    from brainfm.diffusion import make_scheduler

    channels = tuple(model.unet.config.channels)
    unet = DiffusionModelUNet(
        spatial_dims=2, in_channels=1, out_channels=1, channels=(channels[0], *channels),
        attention_levels=(False, False, True), num_res_blocks=1, num_head_channels=model.unet.config.num_head_channels,
        norm_num_groups=model.unet.config.norm_num_groups,
    ).eval()
    scheduler = make_scheduler("ddpm", int(model.noise_scheduler.config.num_train_timesteps))
    t_start = max(1, int(round(t_star * scheduler.config.num_train_timesteps)))
    return unet, scheduler, t_start


@torch.no_grad()
def _pixel_reconstruct(unet, scheduler, t_start: int, image: np.ndarray, batch: int, steps_limit: int | None) -> float:
    """Noise every brain slice to t_start and run the DDPM reverse chain to 0; returns seconds (extrapolated from
    ``steps_limit`` steps when given, which the caller reports)."""
    slices = [z for z in range(image.shape[-1]) if image[..., z].any()]
    x0 = torch.from_numpy(np.ascontiguousarray(image[..., slices].transpose(2, 0, 1)))[:, None]
    generator = torch.Generator().manual_seed(0)
    timesteps = list(range(t_start - 1, -1, -1))
    run = timesteps if steps_limit is None else timesteps[:steps_limit]
    started = time.perf_counter()
    for b in range(0, len(x0), batch):
        x = x0[b:b + batch]
        noise = torch.randn(x.shape, generator=generator)
        x = scheduler.add_noise(x, noise, torch.full((len(x),), t_start - 1))
        for t in run:
            eps = unet(x, torch.full((len(x),), t))
            x = scheduler.step(eps, t, x, generator=generator).prev_sample
    seconds = time.perf_counter() - started
    return seconds * (len(timesteps) / len(run))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, default=None, help="finished `brainfm demo` folder (trained model)")
    parser.add_argument("--volumes", type=int, default=4,
                        help="volumes timed for brainfm (and AUPRC): with --demo, one per lesion kind")
    parser.add_argument("--baseline-steps", type=int, default=25,
                        help="time this many DDPM reverse steps and extrapolate linearly to the full chain (every "
                             "step costs the same; reported as such); 0 = run the whole chain (about an hour on 2 "
                             "CPU cores)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import tempfile

    from brainfm.anomaly.evaluate import cases_from_shards
    from brainfm.pipeline import BrainFMPipeline

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.demo is not None:
            model = BrainFMPipeline.from_pretrained(args.demo / "model")
            cases, kinds = [], set()
            for case in cases_from_shards(model, args.demo / "shards", "test", []):
                if case.label is None or case.lesion_type in kinds:
                    continue  # one lesion volume of each kind, so the AUPRC is not that of one tiny lesion
                cases.append(case)
                kinds.add(case.lesion_type)
                if len(cases) >= args.volumes:
                    break
            print("timed volumes: " + ", ".join(f"{c.name} ({c.lesion_type})" for c in cases))
            trained = True
        else:
            model = _untrained_model(tmp)
            cases = [_template_case(model, tmp)] * args.volumes
            trained = False

        reconstructor = model.reconstructor()
        t_star = float(model.reconstruction.t_star[0])
        # warm-up (first-call allocations), not timed
        reconstructor.reconstruct(torch.from_numpy(cases[0].image)[None], torch.from_numpy(cases[0].anatomy),
                                  cases[0].meta)
        from brainfm.evaluation import MetricAccumulator

        accumulator = MetricAccumulator(threshold=model.calibration.threshold if model.calibration else None)
        started = time.perf_counter()
        for case in cases:
            if trained:
                analysis = model.analyse(case.image, case.mask, case.anatomy, case.meta, reconstructor=reconstructor)
                accumulator.add(analysis.zmap, case.label, case.mask, analysis.mask, analysis.subject_score,
                                case.lesion_type, case.voxel_volume_ml, scan_id=case.name)
            else:
                reconstructor.reconstruct(torch.from_numpy(case.image)[None], torch.from_numpy(case.anatomy),
                                          case.meta)
        ours = (time.perf_counter() - started) / len(cases)

        unet, scheduler, t_start = _pixel_ddpm(model, t_star)
        limit = args.baseline_steps or None
        baseline = _pixel_reconstruct(unet, scheduler, t_start, cases[0].image, reconstructor.config.batch_size,
                                      limit)

    settings = reconstructor.settings()
    members = settings["ensemble_members"]
    print(f"device: CPU, {args.threads} thread(s); volume grid {list(cases[0].image.shape)} "
          f"({int(sum(cases[0].image[..., z].any() for z in range(cases[0].image.shape[-1])))} brain slices)")
    print(f"noise level t*/T = {t_star:g}: brainfm DDIM {settings['unet_calls_per_member'][0]} latent UNet calls x "
          f"{members} member(s); pixel DDPM {t_start} pixel UNet calls")
    auprc = "n/a (untrained)"
    if trained:
        pooled = accumulator.compute()["overall"]["auprc_pooled"]
        auprc = "n/a (no lesion voxels)" if pooled is None else f"{pooled:.3f}"
    how = "whole chain measured" if not limit else f"extrapolated from {limit} timed steps of {t_start}"
    print(f"{'method':<34}{'s / volume':>12}  AUPRC pooled")
    print(f"{'brainfm detect (latent, few-step)':<34}{ours:>12.2f}  {auprc}")
    print(f"{'pixel DDPM (AnoDDPM-style)':<34}{baseline:>12.2f}  n/a (not trained here); {how}")
    print(f"speed-up: {baseline / ours:.1f}x (target >= 10x)")
    if not trained:
        print("note: untrained networks of the demo's sizes; timings only (pass --demo DIR for AUPRC)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
