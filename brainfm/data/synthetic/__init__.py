"""The synthetic cohort: REAL anatomies, SIMULATED subjects, contrasts and lesions (label-driven, as SynthSeg).

Every scan starts from a real anatomy that installs offline (``brainfm.data.anatomies``: ICBM152 2009a, the
OASIS-30 template, pydeface's mean head, FSL's MNI152), as a label map of 13 tissue classes. A subject is that map
under a random smooth deformation with local growth and shrinkage (``deform``), rendered in T1, post-contrast T1,
T2, FLAIR, PD or CT from tissue relaxation times and densities through signal equations with per-site sequence
timings, partial volume, bias field, thick slices and noise (``contrast``). Lesions -- tumour, metastasis, MS,
stroke, small-vessel disease -- are SIMULATED tissues with their own relaxation and gadolinium uptake
(``lesions``): useful to exercise and compare methods, saying nothing about performance on real patients. The
manifest's ``dataset`` column (``brainfm-synth-healthy`` / ``brainfm-synth-lesion``) keeps that visible downstream,
and its ``anatomy`` column lets later code hold one anatomy out of training, validation and calibration.
"""

from brainfm.data.synthetic.cohort import (
    HEALTHY_DATASET,
    LESION_DATASET,
    MANIFEST_COLUMNS,
    SplitPlan,
    SyntheticSubject,
    synthesize_cohort,
    synthesize_subject,
)
from brainfm.data.synthetic.contrast import SITES, SYNTH_MODALITIES, TISSUES
from brainfm.data.synthetic.lesions import LESION_KINDS

__all__ = ["HEALTHY_DATASET", "LESION_DATASET", "LESION_KINDS", "MANIFEST_COLUMNS", "SITES", "SYNTH_MODALITIES",
           "TISSUES", "SplitPlan", "SyntheticSubject", "synthesize_cohort", "synthesize_subject"]
