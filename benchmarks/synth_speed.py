"""Seconds per subject-contrast of the synthetic cohort: 60 subjects (48 healthy, 12 SIMULATED lesions) from three
anatomies, each in T1, FLAIR and T2: at 3 mm in one process and in two, at 2 mm in one. Anatomies are loaded first
(their derived maps come from the disk cache), so the numbers are rendering and writing only. On a 2-core machine
shared with other jobs, two processes only compete for the same cores: read the CPU column there."""

from __future__ import annotations

import tempfile
import time

import torch

from brainfm.data.anatomies import load_anatomy
from brainfm.data.synthetic import SplitPlan, synthesize_cohort

ANATOMIES = ("icbm152", "oasis", "pydeface")
PROTOCOL = ("T1", "FLAIR", "T2")


def main() -> None:
    torch.set_num_threads(1)
    print("resolution  workers  scans  wall s  s/scan (wall)  s/scan (this process's CPU)")
    for resolution in (3, 2):
        for name in ANATOMIES:
            load_anatomy(name, resolution).fractions()
        for workers in (1, 2) if resolution == 3 else (1,):
            with tempfile.TemporaryDirectory() as out:
                wall, cpu = time.perf_counter(), time.process_time()
                synthesize_cohort(out, {"train": SplitPlan(n_healthy=48, n_lesion=12, anatomies=ANATOMIES)},
                                  protocols=[PROTOCOL], resolution=resolution, workers=workers)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            scans = 60 * len(PROTOCOL)
            print(f"{resolution} mm        {workers}       {scans}    {wall:6.1f}  {wall / scans:.3f}          "
                  f"{cpu / scans:.3f}" + ("" if workers == 1 else " (parent only)"))


if __name__ == "__main__":
    main()
