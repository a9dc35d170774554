"""How good are the derived masks and tissue labels of the anatomy sources? Measured where a reference exists.

OASIS ships a brain mask and a tissue map, so each derivation route is run on OASIS with another source as the
atlas and compared with OASIS's own maps:
* brain mask (the pydeface route): FSL's MNI152 head and mask registered onto the OASIS head;
* tissue classes (the pydeface / MNI152-FSL route): ICBM152's labels registered onto the OASIS brain (the prior),
  then the 3-class intensity model; Dice per class for the prior alone and after the intensity model.
Prints one table; about a minute on 2 CPU cores (two registrations).
"""

from __future__ import annotations

import time

import numpy as np

from brainfm.data import anatomies as A

GROUPS = {
    "CSF": (A.CSF, A.VENTRICLES, A.CHOROID_PLEXUS),
    "GM": (A.CORTICAL_GM, A.DEEP_GM, A.CEREBELLAR_GM),
    "WM": (A.WM, A.CEREBELLAR_WM, A.BRAINSTEM),
}


def main() -> None:
    started = time.perf_counter()
    oasis = A.load_anatomy("oasis", 1)
    derived = A.derive_brain_mask(oasis.t1, oasis.affine, atlas="mni152fsl")
    print(f"brain mask, MNI152-FSL registered onto OASIS: Dice {A.dice(derived, oasis.mask):.3f}, "
          f"volume {derived.sum() / 1000:.0f} ml vs {oasis.mask.sum() / 1000:.0f} ml")
    prior = A.transfer(oasis.t1 * oasis.mask, oasis.affine, with_skull=False, atlas="icbm152")["labels"]
    modelled = A.intensity_labels(oasis.t1, oasis.mask, prior)
    print("tissue in OASIS's mask    Dice: ICBM152 labels registered | + intensity model")
    for name, labels in GROUPS.items():
        truth = np.isin(oasis.labels, labels) & oasis.mask
        scores = [A.dice(np.isin(m, labels) & oasis.mask, truth) for m in (prior, modelled)]
        print(f"  {name:3s} {truth.sum() / 1000:5.0f} ml              {scores[0]:.3f}              | {scores[1]:.3f}")
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
