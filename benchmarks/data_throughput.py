"""Read throughput of WebDataset shards vs. a MONAI LoadImage pipeline on the same NIfTI files, and the peak
memory of a shard build for N and 2N subjects (it must not grow with N: the writer streams).

Both readers run in this process with no DataLoader workers, so the ratio is per core. The MONAI baseline does
what a reader without shards must repeat every epoch: load, reorient to RAS, resample to the recipe spacing,
crop/pad to the recipe shape, percentile-normalise, and cut axial slices; the shards already hold that result.

    .venv/bin/python benchmarks/data_throughput.py --subjects 2 --epochs 2 [--tracemalloc]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_subjects(root: Path, n: int, offset: int = 0) -> Path:
    """Template-derived subjects (shifted grid, smooth bias field, mild noise) with brain masks."""
    import nibabel as nib
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    root.mkdir(parents=True, exist_ok=True)
    template = load_mni152_template(resolution=2)
    data = template.get_fdata().astype(np.float32)
    brain = load_mni152_brain_mask(resolution=2).get_fdata() > 0.5
    ramp = np.stack(np.meshgrid(*[np.linspace(-1, 1, k) for k in data.shape], indexing="ij"))
    rows = ["path,subject,split,mask"]
    for i in range(offset, offset + n):
        rng = np.random.default_rng(i)
        affine = template.affine.copy()
        affine[:3, 3] += rng.uniform(-4, 4, 3)
        image = data * (1 + 0.1 * ramp[i % 3]) + rng.normal(0, 0.005, data.shape).astype(np.float32) * brain
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), root / f"s{i:03d}.nii.gz")
        nib.save(nib.Nifti1Image(brain.astype(np.uint8), affine), root / f"s{i:03d}_mask.nii.gz")
        rows.append(f"s{i:03d}.nii.gz,subj{i:03d},train,s{i:03d}_mask.nii.gz")
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


_BUILD_CHILD = """
import json, resource, sys, time, tracemalloc
sys.path.insert(0, {repo!r})
from brainfm.config import DataConfig, load_config
from brainfm.data.writer import build_shards
config = load_config({config!r}, DataConfig)
config.shards.max_samples_per_shard = 2
if {trace}:
    tracemalloc.start()
start = time.perf_counter()
report = build_shards({manifest!r}, {out!r}, config, workers=1)
seconds = time.perf_counter() - start
peak_traced = tracemalloc.get_traced_memory()[1] if {trace} else float("nan")
print(json.dumps({{"n": report.n_accepted, "seconds": seconds, "peak_rss_mb": resource.getrusage(
    resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_python_mb": peak_traced / 2**20}}))
"""


def build_in_subprocess(manifest: Path, out: Path, config: Path, trace: bool) -> dict:
    """A fresh process per build so its peak RSS belongs to that build alone (workers=1: all in one process)."""
    code = _BUILD_CHILD.format(repo=str(REPO), config=str(config), manifest=str(manifest), out=str(out),
                                trace=trace)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", errors="replace", check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def monai_baseline(manifest: Path, recipe, min_brain_fraction: float, epochs: int) -> tuple[float, int, int]:
    """Seconds, volumes and slices for the on-the-fly MONAI pipeline over the manifest's scans."""
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        ResizeWithPadOrCropd,
        ScaleIntensityRangePercentilesd,
        Spacingd,
    )

    from brainfm.data.manifest import read_manifest

    rows, _ = read_manifest(manifest)
    files = [{"image": str(r.path), "mask": str(r.mask)} for r in rows]
    lo, hi = recipe.mri_percentiles
    pipeline = Compose([
        LoadImaged(keys=["image", "mask"]),
        EnsureChannelFirstd(keys=["image", "mask"]),
        Orientationd(keys=["image", "mask"], axcodes="RAS"),
        Spacingd(keys=["image", "mask"], pixdim=recipe.spacing, mode=("bilinear", "nearest")),
        ResizeWithPadOrCropd(keys=["image", "mask"], spatial_size=recipe.shape),
        ScaleIntensityRangePercentilesd(keys="image", lower=lo, upper=hi, b_min=0.0, b_max=1.0, clip=True),
    ])
    threshold = min_brain_fraction * recipe.shape[0] * recipe.shape[1]
    volumes = slices = 0
    start = time.perf_counter()
    for _ in range(epochs):
        for item in files:
            sample = pipeline(item)
            image, mask = sample["image"].as_tensor(), sample["mask"].as_tensor()
            keep = (mask[0] > 0.5).sum(dim=(0, 1)) >= threshold
            batch = image[0].permute(2, 0, 1)[keep]  # axial slices with enough brain
            volumes += 1
            slices += int(batch.shape[0])
    return time.perf_counter() - start, volumes, slices


def shard_reader(out: Path, mode: str, epochs: int, num_workers: int, min_brain_fraction: float) -> tuple[float, int]:
    from brainfm.data.reader import make_dataloader

    loader = make_dataloader(out, "train", mode=mode, batch_size=8 if mode == "2d" else 1, seed=0,
                             num_workers=num_workers, drop_last=False, min_brain_fraction=min_brain_fraction)
    items = 0
    start = time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            items += int(batch["image"].shape[0])
    return time.perf_counter() - start, items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracemalloc", action="store_true",
                        help="also trace Python/numpy allocations (several times slower builds)")
    parser.add_argument("--subjects", type=int, default=2, help="N; the memory check also builds 2N")
    parser.add_argument("--epochs", type=int, default=2, help="read passes for the throughput comparison")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "data" / "demo.yaml")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    args = parser.parse_args()

    import torch

    from brainfm.config import DataConfig, load_config

    torch.set_num_threads(1)
    config = load_config(args.config, DataConfig)
    min_fraction = config.reader.min_brain_fraction
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        n = args.subjects
        small = write_subjects(work / "cohort_n", n)
        large = write_subjects(work / "cohort_2n", 2 * n, offset=1000)
        print(f"building shards for N={n} and 2N={2 * n} subjects ({args.config.name}), one process each ...")
        build_n = build_in_subprocess(small, work / "shards_n", args.config, args.tracemalloc)
        build_2n = build_in_subprocess(large, work / "shards_2n", args.config, args.tracemalloc)
        for label, b in (("N", build_n), ("2N", build_2n)):
            traced = f", peak Python/numpy allocations {b['peak_python_mb']:6.1f} MB" if args.tracemalloc else ""
            print(f"  build {label:>2} ({b['n']:3d} scans): {b['seconds']:6.1f} s, peak RSS {b['peak_rss_mb']:7.1f} MB{traced}")
        ratio = f"peak RSS ratio 2N/N = {build_2n['peak_rss_mb'] / build_n['peak_rss_mb']:.2f}"
        if args.tracemalloc:
            ratio += f", allocation ratio 2N/N = {build_2n['peak_python_mb'] / build_n['peak_python_mb']:.2f}"
        print(f"  {ratio} (1.0 = flat)")

        shards = work / "shards_2n"
        base_s, base_vol, base_slices = monai_baseline(large, config.preprocess, min_fraction, args.epochs)
        vol_s, vols = shard_reader(shards, "3d", args.epochs, 0, min_fraction)
        sl_s, slices = shard_reader(shards, "2d", args.epochs, 0, min_fraction)
        sl2_s, slices2 = shard_reader(shards, "2d", args.epochs, 2, min_fraction)
        print(f"read throughput over {2 * n} scans x {args.epochs} epochs, one core, same process:")
        print(f"  MONAI LoadImage pipeline: {base_vol / base_s:8.1f} volumes/s {base_slices / base_s:9.1f} slices/s")
        print(f"  shards, 3D              : {vols / vol_s:8.1f} volumes/s   ratio {vols / vol_s / (base_vol / base_s):6.1f}x")
        print(f"  shards, 2D              : {slices / sl_s:8.1f} slices/s    ratio "
              f"{slices / sl_s / (base_slices / base_s):6.1f}x")
        print(f"  shards, 2D, 2 workers*  : {slices2 / sl2_s:8.1f} slices/s    ratio "
              f"{slices2 / sl2_s / (base_slices / base_s):6.1f}x")
        print("  * includes starting 2 worker processes every epoch, which dominates at this tiny size")
        if slices != base_slices:
            print(f"  note: slice counts differ ({slices} shards vs {base_slices} MONAI): the shard grid is cropped "
                  "around the brain, the baseline's centre crop is not")


if __name__ == "__main__":
    main()
