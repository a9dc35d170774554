"""Seconds and peak memory per volume: brainfm's latent pseudo-healthy reconstruction in 2D slices, 3D at 3 mm and
3D at 1 mm patch-wise, vs a pixel-space DDPM (AnoDDPM-style), all measured in one run.

Baseline (this process): the pixel DDPM noises the pixels of the 3 mm demo volume slice by slice to t = t* x T and
runs the full step-by-step DDPM reverse chain (t UNet calls on 64x64 pixels, as AnoDDPM does); brainfm noises the
VAE latent to t* and runs a few DDIM steps, then decodes.

Each brainfm configuration runs in a FRESH process (this script with ``--worker``), so its peak resident memory
(the kernel's high-water mark, imports and preprocessing included) is its own:

- ``2D slices, 3 mm``: the 64x64x48 demo grid, axial slices (``configs/pretrain/demo-2d.yaml`` sizes);
- ``3D, 3 mm``: the same grid as one volume (``configs/pretrain/demo-3d.yaml`` sizes);
- ``3D, 1 mm patch-wise``: a 182 x 218 x 182 head at 1 mm (the ICBM152 template resampled onto FSL's MNI152 1 mm
  grid) preprocessed onto a 184 x 224 x 184 model grid, the demo-3d networks with the tiled VAE and the latent UNet
  on overlapping 24^3 latent windows (``reconstruction.tiled_vae``, ``reconstruction.latent_window``).

With ``--demo DIR`` (a finished ``brainfm demo``) and ``--demo3d DIR`` (a finished ``brainfm demo --dims 3`` of the
same settings, hence the same test scans) the trained models are timed on the same simulated-lesion test volumes
(detection: reconstruction + deviation scoring), and a 2D-vs-3D table prints their pooled AUPRC and Dice with 95 %
intervals from each demo's ``report/metrics.json`` beside the measured seconds and peak memory. Without them the
networks are untrained (timings only) and the volume is the ICBM152 template; the 1 mm row is always untrained.

    python benchmarks/detect_speed.py [--demo demo_out] [--demo3d demo3d_out] [--volumes 4] [--threads 1]
                                      [--baseline-steps 25] [--no-1mm]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name: (spatial dims, model grid spacing mm, model grid shape or None = the demo's, reconstruction overrides)
CONFIGS: dict[str, tuple[int, float, tuple[int, int, int] | None, dict[str, Any]]] = {
    "2D slices, 3 mm": (2, 3.0, None, {}),
    "3D, 3 mm": (3, 3.0, None, {}),
    "3D, 1 mm patch-wise": (3, 1.0, (184, 224, 184), {"tiled_vae": True, "latent_window": (24, 24, 24)}),
}
FSL_1MM_SHAPE = (182, 218, 182)
FSL_1MM_AFFINE = np.array([[-1.0, 0, 0, 90], [0, 1, 0, -126], [0, 0, 1, -72], [0, 0, 0, 1]])


def _untrained_model(dims: int, spacing: float, shape: tuple[int, int, int] | None, overrides: dict[str, Any]):
    """A pipeline with the demo's architecture for ``dims`` and random weights, calibrated on nothing (timing
    only), with the demo's reconstruction settings (plus ``overrides``) and its recipe on the given grid."""
    from brainfm.config import DataConfig, DemoSettings, PretrainConfig, load_config
    from brainfm.diffusion import make_scheduler
    from brainfm.models import BrainVAE, Conditioner, LatentUNet
    from brainfm.pipeline import BrainFMPipeline

    data = load_config(REPO / "configs/data/demo.yaml", DataConfig)
    pretrain = load_config(REPO / f"configs/pretrain/demo-{dims}d.yaml", PretrainConfig)
    recipe = data.preprocess
    if shape is not None:
        recipe = dataclasses.replace(recipe, spacing=(spacing,) * 3, shape=shape)
    torch.manual_seed(0)
    vae = BrainVAE(spatial_dims=dims, **dict(pretrain.vae.network))
    unet = LatentUNet(spatial_dims=dims, latent_channels=pretrain.vae.network.latent_channels,
                      anatomy_channels=1 + len(recipe.tissue_priors), prediction_type=pretrain.ldm.prediction_type,
                      **dict(pretrain.ldm.unet))
    conditioner = Conditioner(**dict(pretrain.ldm.conditioner))
    scheduler = make_scheduler("ddpm", pretrain.ldm.num_train_timesteps, prediction_type=pretrain.ldm.prediction_type)
    reconstruction = dataclasses.replace(DemoSettings().reconstruction, **overrides)
    return BrainFMPipeline(vae, unet, conditioner, scheduler, recipe=recipe, modalities=["T1"],
                           reconstruction=reconstruction)


def _template_case(model, tmp: Path, spacing: float):
    """The ICBM152 template (at 1 mm: resampled onto FSL's 182 x 218 x 182 MNI grid, a head-sized input) through
    the model's preprocessing, with its anatomy conditioning; returns (case, input shape, seconds to prepare)."""
    import nibabel as nib
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template
    from nilearn.image import resample_img

    from brainfm.anomaly.evaluate import EvalCase

    resolution = 1 if spacing < 2 else 2
    t1, mask = load_mni152_template(resolution=resolution), load_mni152_brain_mask(resolution=resolution)
    if resolution == 1:
        t1 = resample_img(t1, FSL_1MM_AFFINE, FSL_1MM_SHAPE, interpolation="continuous", force_resample=True,
                          copy_header=True)
        mask = resample_img(mask, FSL_1MM_AFFINE, FSL_1MM_SHAPE, interpolation="nearest", force_resample=True,
                            copy_header=True)
    nib.save(t1, tmp / "t1.nii.gz")
    nib.save(mask, tmp / "mask.nii.gz")
    started = time.perf_counter()
    prepared = model.prepare(tmp / "t1.nii.gz", "T1", tmp / "mask.nii.gz")
    seconds = time.perf_counter() - started
    scan = prepared.scan
    case = EvalCase("icbm152", scan.image, scan.mask > 0, prepared.anatomy, prepared.meta, None, None,
                    prepared.voxel_volume_ml)
    return case, tuple(t1.shape), seconds


def _demo_cases(model, demo: Path, volumes: int) -> list:
    """One simulated-lesion test volume of each lesion kind (so the set is not that of one tiny lesion)."""
    from brainfm.anomaly.evaluate import cases_from_shards

    cases, kinds = [], set()
    for case in cases_from_shards(model, demo / "shards", "test", []):
        if case.label is None or case.lesion_type in kinds:
            continue
        cases.append(case)
        kinds.add(case.lesion_type)
        if len(cases) >= volumes:
            break
    return cases


def _peak_rss_mb() -> float:
    """This process's peak resident memory (the kernel's high-water mark)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration in this (fresh) process: seconds per volume of detection (trained model: reconstruction
    + deviation scoring) or of the reconstruction (untrained), and the process's peak RSS."""
    import tempfile

    from brainfm.pipeline import BrainFMPipeline

    torch.set_num_threads(spec["threads"])
    dims, spacing, shape, overrides = CONFIGS[spec["config"]]
    prepare_s, input_shape = None, None
    with tempfile.TemporaryDirectory() as tmp_name:
        if spec.get("demo"):
            model = BrainFMPipeline.from_pretrained(Path(spec["demo"]) / "model")
            if model.unet.config.spatial_dims != dims:
                raise SystemExit(f"{spec['demo']}: a {model.unet.config.spatial_dims}D model, not {dims}D")
            cases = _demo_cases(model, Path(spec["demo"]), spec["volumes"])
        else:
            model = _untrained_model(dims, spacing, shape, overrides)
            case, input_shape, prepare_s = _template_case(model, Path(tmp_name), spacing)
            cases = [case] * spec["volumes"]
    reconstructor = model.reconstructor()
    trained = model.calibration is not None

    def run(case) -> None:
        if trained:
            model.analyse(case.image, case.mask, case.anatomy, case.meta, reconstructor=reconstructor)
        else:
            reconstructor.reconstruct(torch.from_numpy(case.image)[None], torch.from_numpy(case.anatomy), case.meta)

    if spec["warm_up"]:
        run(cases[0])  # first-call allocations, not timed
    started, cpu_started = time.perf_counter(), time.process_time()
    for case in cases:
        run(case)
    seconds = (time.perf_counter() - started) / len(cases)
    cpu_seconds = (time.process_time() - cpu_started) / len(cases)  # what the load of other jobs does not inflate
    settings = reconstructor.settings()
    return {"config": spec["config"], "seconds": seconds, "cpu_seconds": cpu_seconds, "peak_rss_mb": _peak_rss_mb(), "trained": trained,
            "grid": list(cases[0].image.shape), "input_shape": input_shape, "prepare_s": prepare_s,
            "volumes": [c.name for c in cases], "warm_up": spec["warm_up"],
            "unet_calls": settings["unet_calls_per_member"][0], "members": settings["ensemble_members"],
            "t_star": float(model.reconstruction.t_star[0]), "tiled_vae": settings["tiled_vae"],
            "latent_window": settings["latent_window"]}


def _run_worker(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, capture_output=True,
                          encoding="utf-8", errors="replace", timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{spec['config']}: worker failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _pixel_ddpm(unet_config, num_train_timesteps: int, t_star: float):
    """AnoDDPM-style pixel UNet (MONAI DiffusionModelUNet, no conditioning) sized like the 2D latent UNet, and its
    DDPM schedule."""
    from monai.networks.nets import DiffusionModelUNet

    from brainfm.diffusion import make_scheduler

    channels = tuple(unet_config.channels)
    unet = DiffusionModelUNet(
        spatial_dims=2, in_channels=1, out_channels=1, channels=(channels[0], *channels),
        attention_levels=(False, False, True), num_res_blocks=1, num_head_channels=unet_config.num_head_channels,
        norm_num_groups=unet_config.norm_num_groups,
    ).eval()
    scheduler = make_scheduler("ddpm", num_train_timesteps)
    t_start = max(1, int(round(t_star * scheduler.config.num_train_timesteps)))
    return unet, scheduler, t_start


@torch.no_grad()
def _pixel_reconstruct(unet, scheduler, t_start: int, image: np.ndarray, batch: int, steps_limit: int | None
                       ) -> tuple[float, float]:
    """Noise every brain slice to t_start and run the DDPM reverse chain to 0; returns wall and CPU seconds
    (extrapolated from ``steps_limit`` steps when given, which the caller reports)."""
    slices = [z for z in range(image.shape[-1]) if image[..., z].any()]
    x0 = torch.from_numpy(np.ascontiguousarray(image[..., slices].transpose(2, 0, 1)))[:, None]
    generator = torch.Generator().manual_seed(0)
    timesteps = list(range(t_start - 1, -1, -1))
    run = timesteps if steps_limit is None else timesteps[:steps_limit]
    started, cpu_started = time.perf_counter(), time.process_time()
    for b in range(0, len(x0), batch):
        x = x0[b:b + batch]
        noise = torch.randn(x.shape, generator=generator)
        x = scheduler.add_noise(x, noise, torch.full((len(x),), t_start - 1))
        for t in run:
            eps = unet(x, torch.full((len(x),), t))
            x = scheduler.step(eps, t, x, generator=generator).prev_sample
    scale = len(timesteps) / len(run)
    return (time.perf_counter() - started) * scale, (time.process_time() - cpu_started) * scale


def _baseline(args: argparse.Namespace) -> tuple[float, float, int]:
    """The pixel DDPM's seconds on the first 3 mm volume (the demo's first test volume, else the template)."""
    import tempfile

    from brainfm.pipeline import BrainFMPipeline

    with tempfile.TemporaryDirectory() as tmp_name:
        if args.demo is not None:
            model = BrainFMPipeline.from_pretrained(args.demo / "model")
            image = _demo_cases(model, args.demo, 1)[0].image
        else:
            model = _untrained_model(2, 3.0, None, {})
            image = _template_case(model, Path(tmp_name), 3.0)[0].image
    unet, scheduler, t_start = _pixel_ddpm(model.unet.config, int(model.noise_scheduler.config.num_train_timesteps),
                                           float(model.reconstruction.t_star[0]))
    return (*_pixel_reconstruct(unet, scheduler, t_start, image, model.reconstruction.batch_size,
                                args.baseline_steps or None), t_start)


def _interval(overall: dict[str, Any], key: str) -> str:
    value, ci = overall.get(key), (overall.get("ci") or {}).get(key)
    if value is None:
        return "n/a"
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _comparison(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> None:
    """2D vs 3D on the same test scans: each demo's metrics (all its test volumes) and this run's timings."""
    rows = [("2D slices", args.demo, results["2D slices, 3 mm"]), ("3D volumes", args.demo3d, results["3D, 3 mm"])]
    print("\n2D vs 3D, the same simulated-lesion test scans (pooled over every test volume, 95 % bootstrap intervals "
          "over subjects; seconds and peak RSS from this run)")
    print("| model | test volumes (lesion / healthy) | LDM AUPRC pooled | LDM Dice at the calibrated threshold | "
          "s / volume, detect (CPU s) | peak RSS (detect process) | training s (VAE + LDM) |")
    print("|---|---|---|---|---|---|---|")
    scans = []
    for label, demo, result in rows:
        everything = json.loads((demo / "report" / "metrics.json").read_text(encoding="utf-8"))
        metrics = everything["ldm"]
        scans.append(sorted(v["scan_id"] for v in metrics["per_volume"]))
        atlas = everything.get("atlas_baseline", {}).get("overall", {})
        run = json.loads((demo / "report" / "run.json").read_text(encoding="utf-8"))
        overall = metrics["overall"]
        train_s = sum(run["timings_s"].get(k, 0.0) for k in ("pretrain vae", "pretrain ldm"))
        print(f"| {label} | {overall['n_lesion_volumes']} / {metrics['healthy']['n_scans']} | "
              f"{_interval(overall, 'auprc_pooled')} | {_interval(overall, 'dice_pooled')} | "
              f"{result['seconds']:.2f} ({result['cpu_seconds']:.2f}) | {result['peak_rss_mb']:,.0f} MB | "
              f"{train_s:,.0f} |")
        print(f"|   normative atlas (no network) | | {_interval(atlas, 'auprc_pooled')} | "
              f"{_interval(atlas, 'dice_pooled')} | | | |")
    print(f"same test scans in both demos: {'yes' if scans[0] == scans[1] else 'NO'} ({len(scans[0])} volumes)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, default=None, help="finished `brainfm demo` folder (trained 2D model)")
    parser.add_argument("--demo3d", type=Path, default=None,
                        help="finished `brainfm demo --dims 3` folder of the same settings (trained 3D model)")
    parser.add_argument("--volumes", type=int, default=4,
                        help="3 mm volumes timed per configuration: with --demo, one per lesion kind")
    parser.add_argument("--volumes-1mm", type=int, default=1, help="1 mm volumes timed (no warm-up call)")
    parser.add_argument("--no-1mm", action="store_true", help="leave out the 1 mm patch-wise row")
    parser.add_argument("--baseline-steps", type=int, default=25,
                        help="time this many DDPM reverse steps and extrapolate linearly to the full chain (every "
                             "step costs the same; reported as such); 0 = run the whole chain (about an hour on 2 "
                             "CPU cores)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per configuration")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))))
        return 0
    torch.set_num_threads(args.threads)

    results: dict[str, dict[str, Any]] = {}
    for name in CONFIGS:
        if name.endswith("1 mm patch-wise") and args.no_1mm:
            continue
        demo = {"2D slices, 3 mm": args.demo, "3D, 3 mm": args.demo3d}.get(name)
        one_mm = name.endswith("1 mm patch-wise")
        spec = {"config": name, "demo": None if demo is None else str(demo), "threads": args.threads,
                "volumes": args.volumes_1mm if one_mm else args.volumes, "warm_up": not one_mm}
        started = time.perf_counter()
        results[name] = _run_worker(spec, args.timeout)
        print(f"[{name}] {time.perf_counter() - started:.0f} s: {json.dumps(results[name])}", flush=True)
    baseline, baseline_cpu, t_start = _baseline(args)

    first = next(iter(results.values()))
    how = (f"extrapolated from {args.baseline_steps} timed steps of {t_start}" if args.baseline_steps
           else "whole chain measured")
    print(f"\ndevice: CPU, {args.threads} thread(s), load average {[round(v, 1) for v in os.getloadavg()]} (1, 5, 15 "
          f"min) at the end; pixel DDPM from t*/T = {first['t_star']:g}; every brainfm row in its own process (peak RSS "
          f"= that process's high-water mark, imports and preprocessing included); CPU s = process CPU time, which "
          f"other jobs on the machine do not inflate")
    reference = results["2D slices, 3 mm"]
    print("| configuration | model grid (input) | timed | latent UNet calls x members (t*/T) | s / volume (CPU s) | "
          "peak RSS | vs pixel DDPM (CPU s) | CPU s vs 2D slices | RSS vs 2D slices |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        grid = "x".join(map(str, r["grid"])) + ("" if not r["input_shape"] else
                                                " (" + "x".join(map(str, r["input_shape"])) + ")")
        timed = ("detect" if r["trained"] else "reconstruction, untrained") + (
            f", {len(r['volumes'])} vol" + ("" if r["warm_up"] else ", no warm-up"))
        extra = [k for k in ("tiled_vae",) if r[k]] + ([f"window {r['latent_window']}"] if r["latent_window"] else [])
        print(f"| {name}{' (' + ', '.join(extra) + ')' if extra else ''} | {grid} | {timed} | "
              f"{r['unet_calls']} x {r['members']} ({r['t_star']:g}) | {r['seconds']:.2f} ({r['cpu_seconds']:.2f}) | "
              f"{r['peak_rss_mb']:,.0f} MB | "
              + (f"{baseline_cpu / r['cpu_seconds']:.1f}x faster" if r["grid"] == reference["grid"] else
                 "n/a (another grid)")
              + f" | {r['cpu_seconds'] / reference['cpu_seconds']:.2f}x | "
              f"{r['peak_rss_mb'] / reference['peak_rss_mb']:.2f}x |")
    print(f"| pixel DDPM (AnoDDPM-style), 3 mm slices, untrained | 64x64 slices | {how} | {t_start} pixel UNet "
          f"calls | {baseline:.2f} ({baseline_cpu:.2f}) | (this process) | 1.0x | "
          f"{baseline_cpu / reference['cpu_seconds']:.2f}x | |")
    one_mm = results.get("3D, 1 mm patch-wise")
    if one_mm is not None:
        verdict = "under" if one_mm["peak_rss_mb"] < 8192 else "OVER"
        print(f"1 mm head: peak RSS {one_mm['peak_rss_mb']:,.0f} MB, {verdict} the 8 GB bound; preprocessing "
              f"{one_mm['prepare_s']:.1f} s, reconstruction {one_mm['seconds']:.1f} s per volume")
    if args.demo is not None and args.demo3d is not None:
        _comparison(args, results)
    if args.demo is None or args.demo3d is None:
        print("note: rows without --demo/--demo3d use untrained networks of the demo's sizes (timings only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
