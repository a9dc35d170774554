"""``brainfm study priors``: conditioning and calibration not tied to one template (issue 13 item 4).

Where the conditioning's tissue priors come from, each with its own LDM (the demo's VAE and steps, trained on the
same training scans; only the priors differ), crossed with how residuals are normalised into z-maps, compared on
the VALIDATION anatomy only (the protocol of :mod:`brainfm.studies.common`). The derived shard folders hold the
training and validation splits only: the test anatomy is never read.

Prior sources (all on the scan's model grid, which preprocessing aligned to the template):

- ``affine``: ICBM152's GM/WM maps through the scan's affine template registration (what the shards store; the
  demo's model);
- ``deformable``: those maps moved by a deformable registration (fast symmetric-forces demons, single-threaded)
  between the scan and a contrast-matched image of the maps themselves (the per-scan least-squares fit of the scan's
  intensity on 1, GM and WM: demons needs one contrast on both sides, and this works for every modality);
- ``templates``: the mean of ICBM152's maps and those of ``prior_templates`` (real anatomies of
  :mod:`brainfm.data.anatomies`, their tissue labels as fractions), each placed by its own affine registration to
  the scan. The validation and test anatomies may not be among them;
- ``none``: no spatial priors: the prior channels are zero, the brain mask and the metadata tokens remain.

Normalisation: ``voxelwise`` (per-voxel healthy mean/std on the template-aligned grid), ``regional`` (per tissue
class of the scan's own priors) and ``global`` (median/MAD of all healthy brain voxels).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from brainfm.config import DemoSettings, StudySettings, to_dict
from brainfm.config.studies import PriorSource
from brainfm.demo import DemoContext, stage_pretrain
from brainfm.evaluation.bootstrap import BootstrapSettings
from brainfm.io import BrainFMInputError
from brainfm.pipeline import BrainFMPipeline
from brainfm.studies.common import (
    STANDARD_COLUMNS,
    SampleTransform,
    baseline_metrics,
    build_base,
    choose,
    derive_shards,
    describe,
    ldm_residuals,
    load_cases,
    markdown_table,
    score_residuals,
    separation_note,
    summary,
    validation_sets,
    write_table,
)

SELECTION_SPLITS = ("train", "val")  # what a derived shard folder holds: never the test split
DEMONS_ITERATIONS = 50
DEMONS_SIGMA_VOX = 1.5


def deformable_priors(image: np.ndarray, mask: np.ndarray, priors: np.ndarray) -> np.ndarray:
    """``priors`` (C, X, Y, Z) moved onto the scan by demons between the scan and the least-squares fit of its
    intensity on [1, priors] (a template image in the scan's own contrast); 0 outside the brain."""
    import SimpleITK as sitk

    from brainfm.data.registration import itk_threads

    brain = np.asarray(mask) > 0
    image = np.asarray(image, np.float32) * brain
    design = np.concatenate([np.ones((1, int(brain.sum())), np.float32), priors[:, brain].astype(np.float32)])
    coef, *_ = np.linalg.lstsq(design.T, image[brain], rcond=None)
    synthetic = np.zeros_like(image)
    synthetic[brain] = design.T @ coef
    with itk_threads(1):
        fixed, moving = sitk.GetImageFromArray(image), sitk.GetImageFromArray(synthetic.astype(np.float32))
        demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
        demons.SetNumberOfIterations(DEMONS_ITERATIONS)
        demons.SetStandardDeviations(DEMONS_SIGMA_VOX)
        field = demons.Execute(fixed, moving)
        transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
        moved = [sitk.GetArrayFromImage(sitk.Resample(sitk.GetImageFromArray(np.asarray(p, np.float32)), fixed,
                                                      transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
                 for p in priors]
    return (np.clip(np.stack(moved), 0.0, 1.0) * brain).astype(np.float32)


def template_priors(name: str, resolution: int, tissue_priors: Sequence[str]) -> tuple[np.ndarray, ...]:
    """(brain T1, brain mask, priors (C, ...), affine) of a real anatomy, its tissue labels as fractions."""
    from brainfm.data import anatomies as a

    anatomy = a.load_anatomy(name, resolution)
    fractions = anatomy.fractions()
    classes = {"gm": (a.CORTICAL_GM, a.DEEP_GM, a.CEREBELLAR_GM), "wm": (a.WM, a.CEREBELLAR_WM, a.BRAINSTEM),
               "csf": (a.CSF, a.VENTRICLES, a.CHOROID_PLEXUS)}
    priors = np.stack([fractions[list(classes[n])].sum(axis=0) for n in tissue_priors]).astype(np.float32)
    return anatomy.t1 * anatomy.mask, anatomy.mask, priors, anatomy.affine


def registered_priors(image: np.ndarray, mask: np.ndarray, grid_affine: np.ndarray,
                      template: tuple[np.ndarray, ...], source: str) -> np.ndarray:
    """A template's priors on the scan grid through an affine registration of its brain to the scan's."""
    import SimpleITK as sitk

    from brainfm.data.registration import itk_threads, register_affine, sitk_image

    t1, t_mask, priors, t_affine = template
    matrix = register_affine(np.asarray(image, np.float32) * mask, grid_affine, t1, t_affine, source=source,
                             moving_mask=t_mask)
    transform = sitk.AffineTransform(3)
    transform.SetMatrix([float(v) for v in matrix[:3, :3].ravel()])
    transform.SetTranslation([float(v) for v in matrix[:3, 3]])
    reference = sitk_image(np.zeros(image.shape, np.float32), grid_affine)
    moved = []
    with itk_threads(1):
        for prior in priors:
            out = sitk.Resample(sitk_image(prior, t_affine), reference, transform, sitk.sitkLinear, 0.0,
                                sitk.sitkFloat32)
            moved.append(np.transpose(sitk.GetArrayFromImage(out), (2, 1, 0)))
    return (np.clip(np.stack(moved), 0.0, 1.0) * (np.asarray(mask) > 0)).astype(np.float32)


def prior_transform(source: PriorSource, study: StudySettings, demo: DemoSettings,
                    tissue_priors: Sequence[str]) -> SampleTransform:
    """The shard transform that replaces a sample's prior channels (the stored ones are the ``affine`` source)."""
    forbidden = set(demo.val_anatomies) | set(demo.test_anatomies)
    if source == "templates" and forbidden & set(study.prior_templates):
        raise BrainFMInputError(None, f"prior_templates may not include a validation or test anatomy "
                                      f"({sorted(forbidden & set(study.prior_templates))})")
    templates = ([template_priors(n, demo.resolution, tissue_priors) for n in study.prior_templates]
                 if source == "templates" else [])

    def transform(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        image, mask = arrays["image"][0].astype(np.float32), arrays["mask"][0] > 0
        stored = arrays["anatomy"].astype(np.float32)
        if source == "none":
            priors = np.zeros_like(stored)
        elif source == "deformable":
            priors = deformable_priors(image, mask, stored)
        elif source == "templates":
            grid = np.asarray(meta["grid_affine"], np.float64)
            each = [stored] + [registered_priors(image, mask, grid, t, meta.get("source_path") or meta["key"])
                               for t in templates]
            priors = np.mean(each, axis=0)
        else:
            raise ValueError(f"no transform for prior source {source!r}")
        return {**arrays, "anatomy": priors.astype(np.float16)}

    return transform


def variant_model(out: Path, base: DemoContext, source: PriorSource, study: StudySettings) -> tuple[Path, Path]:
    """(shard folder, LDM folder) of one prior source; the LDM is trained like the base's, on its own priors,
    with the base's VAE."""
    if source == "affine":
        return base.shards, base.out / "runs" / "ldm" / "model"
    folder = out / "priors" / source
    shards = derive_shards(base.shards, folder / "shards", SELECTION_SPLITS,
                           prior_transform(source, study, base.settings, base.data_config.preprocess.tissue_priors),
                           f"tissue priors: {source}")
    pretrain = base.pretrain
    pretrain = dataclasses.replace(
        pretrain, data=dataclasses.replace(pretrain.data, shard_dir=str(shards)),
        train=dataclasses.replace(pretrain.train, output_dir=str(folder / "runs")),
        ldm=dataclasses.replace(pretrain.ldm, vae_path=str(base.out / "runs" / "vae" / "vae")))
    ctx = DemoContext(folder, base.settings, base.data_config, pretrain)
    model = folder / "runs" / "ldm" / "model"
    if not (model / "model_index.json").is_file():
        print(f"[study priors] {source}: training the LDM", flush=True)
        stage_pretrain(ctx, "ldm")
    return shards, model


def run_priors(out: Path, study: StudySettings, demo: DemoSettings) -> dict[str, Any]:
    """Every (prior source, normalisation) on validation; writes ``out/priors/priors.{md,json}``."""
    base = build_base(out / "base", demo)
    bootstrap = BootstrapSettings(n_resamples=study.bootstrap_resamples)
    config = demo.deviation
    done = out / "priors" / "priors.json"  # the folder's settings were checked: finished rows are reused
    rows: dict[str, dict[str, Any]] = json.loads(done.read_bytes())["rows"] if done.is_file() else {}
    for source in study.priors if not rows else ():
        shards, model = variant_model(out, base, source, study)
        pipeline = BrainFMPipeline.from_pretrained(model)
        val = validation_sets(load_cases(pipeline, shards, "val"))
        print(f"[study priors] {source}: validation", flush=True)
        calibration = ldm_residuals(pipeline, demo.reconstruction, val.calibration, config.residual)
        scored = ldm_residuals(pipeline, demo.reconstruction, val.scored, config.residual)
        for normalisation in study.normalisations:
            metrics = score_residuals(calibration, val.calibration, scored, val.scored,
                                      dataclasses.replace(config, normalisation=normalisation), bootstrap)
            rows[f"{source} / {normalisation}"] = {**summary(metrics), "prior_source": source,
                                                   "normalisation": normalisation}
    chosen, rule = choose(rows, config.target_fpr, study.fpr_factor)
    pipeline = BrainFMPipeline.from_pretrained(base.out / "runs" / "ldm" / "model")
    val = validation_sets(load_cases(pipeline, base.shards, "val"))
    atlas = [c for c in load_cases(pipeline, base.shards, "train") if c.label is None]
    baselines = {m: summary(v) for m, v in baseline_metrics(val.calibration, val.scored, atlas, config,
                                                            bootstrap).items()}
    table = {**rows, **{f"baseline: {m}": r for m, r in baselines.items()}}
    text = "\n\n".join([
        f"Validation anatomy only ({describe(demo)}; reconstruction {to_dict(demo.reconstruction)}); calibration on "
        f"{len(val.calibration)} healthy scans, FPR on {len(val.held_out)} other healthy scans, AUPRC on "
        f"{len(val.lesion)} SIMULATED-lesion scans. Rows: prior source / normalisation.",
        markdown_table(table, STANDARD_COLUMNS, "priors / normalisation", chosen),
        f"Kept ({rule}): {chosen}. " + separation_note(rows, chosen)
        + (" Without priors there is one tissue region, so 'none / regional' is global normalisation."
           if "none" in study.priors and "regional" in study.normalisations else "")])
    write_table(out / "priors", "priors", text, {
        "study": "priors", "split": "val", "rows": rows, "baselines": baselines, "chosen": chosen, "rule": rule,
        "study_settings": to_dict(study), "demo_settings": to_dict(demo)})
    return {"rows": rows, "baselines": baselines, "chosen": chosen, "rule": rule}


__all__ = ["SELECTION_SPLITS", "deformable_priors", "prior_transform", "registered_priors", "run_priors",
           "template_priors", "variant_model"]
