"""Subjects and cohorts: REAL anatomies, SIMULATED subjects, contrasts and lesions, written as NIfTI + manifest.

A subject is one anatomy source (``brainfm.data.anatomies``) under one random geometry (``deform``), optionally
with one SIMULATED lesion (``lesions``), rendered in one or more contrasts (``contrast``) that share its geometry,
brain mask, lesion label and subject id. A cohort is a set of splits, each with its own subject counts and
anatomy sources, so that an anatomy can be held out of training, validation and calibration altogether.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import multiprocessing
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from brainfm.data.anatomies import SOURCES, load_anatomy
from brainfm.data.synthetic.contrast import SITES, SYNTH_MODALITIES, TISSUE_INDEX, render
from brainfm.data.synthetic.deform import push as mass_effect
from brainfm.data.synthetic.deform import sample_geometry, warp_fractions
from brainfm.data.synthetic.lesions import LESION_KINDS, paint_lesion, plan_lesion
from brainfm.io import BrainFMInputError, save_nifti, write_text

MANIFEST_COLUMNS: tuple[str, ...] = (
    "path", "subject", "dataset", "modality", "age", "sex", "site", "split", "mask", "label",
    "lesion_type", "lesion_volume_ml", "anatomy",
)
HEALTHY_DATASET = "brainfm-synth-healthy"
LESION_DATASET = "brainfm-synth-lesion"


@dataclasses.dataclass
class SyntheticSubject:
    """One subject: every contrast on one grid, with the shared geometry's brain mask, tissues and lesion."""

    subject: str
    images: dict[str, np.ndarray]  # modality -> float32 scan (MRI: scanner units; CT: HU)
    mask: np.ndarray  # uint8 brain mask (the subject's own, warped)
    fractions: np.ndarray  # float32 (len(TISSUES), X, Y, Z) tissue shares, lesion tissues included
    label: np.ndarray | None  # uint8 lesion label, only for lesion subjects
    affine: np.ndarray
    anatomy: str
    age: int
    sex: str
    site: str
    lesion_type: str = "healthy"
    lesion_volume_ml: float = 0.0

    @property
    def labels(self) -> np.ndarray:
        """uint8 dominant tissue per voxel (index into ``TISSUES``): the geometry every contrast shares."""
        return np.argmax(self.fractions, axis=0).astype(np.uint8)

    @property
    def gm(self) -> np.ndarray:
        """Grey-matter share per voxel (cortex, deep nuclei, cerebellar cortex): a subject-true tissue prior."""
        return self.fractions[[TISSUE_INDEX[n] for n in ("cortical_gm", "deep_gm", "cerebellar_gm")]].sum(0)

    @property
    def wm(self) -> np.ndarray:
        """White-matter share per voxel (cerebral and cerebellar white matter, brainstem)."""
        return self.fractions[[TISSUE_INDEX[n] for n in ("wm", "cerebellar_wm", "brainstem")]].sum(0)


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    """One split of a cohort: how many healthy and SIMULATED-lesion subjects, drawn from which anatomies
    (cycled over the subjects). The split name "" leaves the split column blank for the shard writer to fill."""

    n_healthy: int = 0
    n_lesion: int = 0
    anatomies: tuple[str, ...] = ("icbm152",)


def synthesize_subject(
    subject: str,
    seed: int | Sequence[int],
    modalities: Sequence[str] = ("T1",),
    anatomy: str = "icbm152",
    resolution: int = 2,
    lesion_kind: str | None = None,
) -> SyntheticSubject:
    """Render one subject in ``modalities``. Metadata, geometry, lesion and each contrast's appearance come from
    separate random streams of ``seed``: the same subject with and without a lesion differs only in the lesion
    (and, for a tumour, its mass effect), and adding a contrast changes none of the others."""
    modalities = tuple(modalities)
    if not modalities or any(m not in SYNTH_MODALITIES for m in modalities) or len(set(modalities)) < len(modalities):
        raise ValueError(f"modalities must be distinct names from {SYNTH_MODALITIES}, got {modalities}")
    if lesion_kind is not None and lesion_kind not in LESION_KINDS:
        raise ValueError(f"lesion kind must be one of {LESION_KINDS}, got {lesion_kind!r}")
    meta_rng, geometry_rng, lesion_rng, look_seed = np.random.SeedSequence(seed).spawn(4)
    meta_rng, geometry_rng, lesion_rng = (np.random.default_rng(s) for s in (meta_rng, geometry_rng, lesion_rng))
    source = load_anatomy(anatomy, resolution)
    age = int(meta_rng.integers(20, 86))
    sex = str(meta_rng.choice(["F", "M"]))
    site = str(meta_rng.choice(sorted(SITES)))

    geometry = sample_geometry(source, geometry_rng, age=age)
    fractions, mask = warp_fractions(source, geometry)
    label, volume_ml = None, 0.0
    if lesion_kind is not None:
        plan = plan_lesion(lesion_kind, fractions, mask, lesion_rng, float(resolution))
        if plan.mass_mm > 0:
            mass_effect(geometry, plan.centre, plan.mass_mm, float(resolution), mask)
            fractions, mask = warp_fractions(source, geometry)
        label = paint_lesion(plan, fractions, mask, lesion_rng, float(resolution))
        volume_ml = float(label.sum()) * source.voxel_ml

    images = {}
    for modality in modalities:  # one stream per modality name: independent of which others are rendered
        rng = np.random.default_rng([*look_seed.generate_state(2), zlib.crc32(modality.encode())])
        images[modality] = render(fractions, modality, SITES[site], rng, float(resolution))
    return SyntheticSubject(
        subject=subject, images=images, mask=mask.astype(np.uint8), fractions=fractions, label=label,
        affine=np.asarray(source.affine), anatomy=anatomy, age=age, sex=sex, site=site,
        lesion_type=lesion_kind or "healthy", lesion_volume_ml=volume_ml,
    )


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _write_subject(job: tuple, out_dir: Path, resolution: int) -> list[dict[str, object]]:
    """Render one planned subject, write its scans, mask and label; return its manifest rows."""
    name, subject_seed, split, anatomy, kind, modalities = job
    subject = synthesize_subject(name, subject_seed, modalities, anatomy=anatomy, resolution=resolution,
                                 lesion_kind=kind)
    mask_rel = f"masks/{name}_mask.nii.gz"
    save_nifti(subject.mask, subject.affine, out_dir / mask_rel, dtype=np.uint8)
    label_rel = ""
    if subject.label is not None:
        label_rel = f"labels/{name}_label.nii.gz"
        save_nifti(subject.label, subject.affine, out_dir / label_rel, dtype=np.uint8)
    rows = []
    for modality, image in subject.images.items():
        image_rel = f"images/{name}_{modality}.nii.gz"
        # int16, as scanners write them (MRI in scanner units, CT in HU): 4x smaller and faster than float32
        save_nifti(np.clip(np.rint(image), -32768, 32767), subject.affine, out_dir / image_rel, dtype=np.int16)
        rows.append({
            "path": image_rel, "subject": name, "dataset": LESION_DATASET if kind else HEALTHY_DATASET,
            "modality": modality, "age": subject.age, "sex": subject.sex, "site": subject.site, "split": split,
            "mask": mask_rel, "label": label_rel, "lesion_type": subject.lesion_type,
            "lesion_volume_ml": f"{subject.lesion_volume_ml:.3f}", "anatomy": anatomy,
        })
    return rows


def synthesize_cohort(
    out_dir: str | Path,
    splits: Mapping[str, SplitPlan],
    *,
    protocols: Sequence[Sequence[str]] = (("T1",),),
    lesion_kinds: Sequence[str] = LESION_KINDS,
    held_out_anatomies: Sequence[str] = (),
    held_out_splits: Sequence[str] = ("test",),
    seed: int = 0,
    resolution: int = 2,
    workers: int = 1,
) -> Path:
    """Write every split's subjects (one NIfTI per contrast, a brain mask per subject, a lesion label per lesion
    subject) and ``manifest.csv`` (one row per scan, with its ``anatomy``); return the manifest path.

    ``protocols`` are the contrast sets a subject can have, cycled over subjects (``[("T1", "FLAIR"), ("CT",)]``:
    every other subject is CT). Lesion subjects cycle through ``lesion_kinds``. ``held_out_anatomies`` may appear
    only in the splits named in ``held_out_splits`` (a ValueError otherwise; "test", and e.g. "adapt" for the healthy
    scans a site adaptation uses), so a model can be tested on an anatomy it never saw.
    The manifest is written last (an interrupted run leaves none); paths in it are relative to its folder; the
    same arguments give the same files, byte for byte, whatever the number of ``workers`` (processes; each loads
    the anatomies it needs once, a second or two).
    """
    protocols = tuple(tuple(p) for p in protocols)
    lesion_kinds = tuple(lesion_kinds)
    if not protocols or any(not p or any(m not in SYNTH_MODALITIES for m in p) for p in protocols):
        raise ValueError(f"protocols must be non-empty sets of modalities from {SYNTH_MODALITIES}, got {protocols}")
    if not splits or sum(p.n_healthy + p.n_lesion for p in splits.values()) == 0:
        raise ValueError("need at least one subject in the splits")
    for name, plan in splits.items():
        if plan.n_healthy < 0 or plan.n_lesion < 0 or not plan.anatomies:
            raise ValueError(f"split {name!r}: counts must be >= 0 and anatomies non-empty, got {plan}")
        if unknown := sorted(set(plan.anatomies) - set(SOURCES)):
            raise ValueError(f"split {name!r}: unknown anatomies {unknown}; choose from {', '.join(SOURCES)}")
        if name not in held_out_splits and (leaked := sorted(set(plan.anatomies) & set(held_out_anatomies))):
            raise ValueError(f"split {name!r} uses held-out anatomies {leaked}: they belong to the "
                             f"{'/'.join(held_out_splits)} split(s) only")
    if any(p.n_lesion for p in splits.values()) and (not lesion_kinds or set(lesion_kinds) - set(LESION_KINDS)):
        raise ValueError(f"lesion_kinds must be a non-empty subset of {LESION_KINDS}, got {lesion_kinds}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise BrainFMInputError(out_dir, "output path exists and is not a folder")

    jobs = []
    for split, plan in splits.items():
        tag = split or "pool"
        for group, count in ((0, plan.n_healthy), (1, plan.n_lesion)):
            for index in range(count):
                anatomy = plan.anatomies[index % len(plan.anatomies)]
                kind = lesion_kinds[index % len(lesion_kinds)] if group else None
                name = f"synth-{tag}-{'lesion' if group else 'healthy'}-{index:04d}"
                jobs.append((name, (seed, zlib.crc32(tag.encode()), group, index), split, anatomy, kind,
                             protocols[index % len(protocols)]))

    progress = {"desc": "synth", "unit": "subject", "total": len(jobs), "disable": None}
    if workers > 1 and len(jobs) > 1:
        # spawn, not fork: a forked child of a process that already ran torch/OpenMP can deadlock
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context, initializer=_one_thread) as pool:
            written = list(tqdm(pool.map(_write_subject, jobs, itertools.repeat(out_dir),
                                         itertools.repeat(resolution)), **progress))
    else:
        written = [_write_subject(job, out_dir, resolution) for job in tqdm(jobs, **progress)]
    rows = [row for subject_rows in written for row in subject_rows]

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    manifest = out_dir / "manifest.csv"
    write_text(manifest, buffer.getvalue())
    return manifest



