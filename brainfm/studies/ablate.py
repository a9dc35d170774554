"""``brainfm study ablate``: make the LDM earn its place (issue 13 item 6).

One trained model (the demo's stages), its inference-side settings varied one factor at a time on the
VALIDATION anatomy only — t*, the sampler's step grid, the ensemble size, guidance (0 = unconditional, i.e.
conditioning off; 1 = conditional; > 1 = classifier-free guidance) — each factor's best (see
:func:`brainfm.studies.common.choose`) carried into the next factor's candidates. The chosen setting is then
frozen: the model is calibrated with it on every healthy validation scan (with the baselines), exactly as the demo
calibrates, and evaluated ONCE on the held-out test anatomy. The test split is read only after the choice.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from brainfm.config import DemoSettings, ReconstructionConfig, StudySettings, to_dict
from brainfm.evaluation.bootstrap import BootstrapSettings
from brainfm.io import write_json
from brainfm.pipeline import BrainFMPipeline
from brainfm.studies.common import (
    HEADLINE_TYPES,
    STANDARD_COLUMNS,
    baseline_metrics,
    build_base,
    cell,
    choose,
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

FACTORS = ("t_star", "num_inference_steps", "seeds", "guidance_scale")
CANDIDATES_FILE = "candidates.json"  # ablate/: each validated candidate's row, for a resumed selection
TEST_METHODS = ("ldm", "vae_baseline", "intensity_baseline", "atlas_baseline")  # the prior-fit check: report only


def setting_name(reconstruction: ReconstructionConfig) -> str:
    return (f"t* {','.join(f'{t:g}' for t in reconstruction.t_star)}, {reconstruction.num_inference_steps} steps, "
            f"{len(reconstruction.seeds)} seed(s), guidance {reconstruction.guidance_scale:g}")


def candidates(study: StudySettings, factor: str, current: ReconstructionConfig) -> list[ReconstructionConfig]:
    """``current`` with ``factor`` set to each of the study's values (in the study's order)."""
    values: list[Any] = {
        "t_star": [(t,) for t in study.t_star],
        "num_inference_steps": list(study.inference_steps),
        "seeds": [tuple(range(n)) for n in study.ensemble_sizes],
        "guidance_scale": list(study.guidance_scales),
    }[factor]
    return [dataclasses.replace(current, **{factor: value}) for value in values]


def select_setting(pipeline: BrainFMPipeline, shards: Path, study: StudySettings, demo: DemoSettings,
                   cache: Path | None = None) -> dict[str, Any]:
    """The validation-only ablation: every evaluated setting's row, the path of choices, and the chosen setting.
    ``cache``: each evaluated candidate's row is written there as it finishes and read back by a rerun in the same
    study folder (whose settings were checked), so an interrupted selection loses one candidate at most."""
    bootstrap = BootstrapSettings(n_resamples=study.bootstrap_resamples)
    config = demo.deviation
    val = validation_sets(load_cases(pipeline, shards, "val"))
    done: dict[str, dict[str, Any]] = json.loads(cache.read_bytes()) if cache and cache.is_file() else {}
    rows: dict[str, dict[str, Any]] = {}
    settings: dict[str, ReconstructionConfig] = {}
    path = []
    current = demo.reconstruction
    for factor in FACTORS:
        names = []
        for candidate in candidates(study, factor, current):
            name = setting_name(candidate)
            names.append(name)
            if name in rows:
                continue
            settings[name] = candidate
            if name in done:
                rows[name] = {**done[name], "varied": factor}
                print(f"[study ablate] validation: {name} (read back)", flush=True)
                continue
            print(f"[study ablate] validation: {name}", flush=True)
            metrics = score_residuals(ldm_residuals(pipeline, candidate, val.calibration, config.residual),
                                      val.calibration, ldm_residuals(pipeline, candidate, val.scored, config.residual),
                                      val.scored, config, bootstrap)
            rows[name] = {**summary(metrics), "varied": factor}
            if cache is not None:
                done[name] = rows[name]
                write_json(cache, done)
        best, rule = choose({n: rows[n] for n in names}, config.target_fpr, study.fpr_factor)
        path.append({"factor": factor, "candidates": names, "chosen": best})
        current = settings[best]
    atlas = load_cases(pipeline, shards, "train")
    atlas = [c for c in atlas if c.label is None]
    baselines = {m: summary(v) for m, v in baseline_metrics(val.calibration, val.scored, atlas, config,
                                                            bootstrap).items()}
    chosen = setting_name(current)
    return {"rows": rows, "settings": {n: to_dict(s) for n, s in settings.items()}, "path": path, "chosen": chosen,
            "chosen_setting": to_dict(current), "rule": rule, "baselines": baselines,
            "validation": {"n_calibration": len(val.calibration), "n_held_out_healthy": len(val.held_out),
                           "n_lesion": len(val.lesion)}}


def headline_verdict(metrics: dict[str, Any], target_fpr: float, factor: float) -> dict[str, Any]:
    """Does the LDM beat the strongest baseline (by pooled AUPRC of that lesion type) with non-overlapping 95 %
    intervals, per headline lesion type; is its healthy FPR on the held-out anatomy <= factor x target?"""
    verdict: dict[str, Any] = {}
    ldm = metrics["ldm"]
    for kind in HEADLINE_TYPES:
        group = ldm["by_lesion_type"].get(kind)
        if group is None:
            verdict[kind] = {"answer": None, "why": f"no {kind} scans in the test set"}
            continue
        others = {m: metrics[m]["by_lesion_type"][kind] for m in TEST_METHODS[1:] if m in metrics
                  and kind in metrics[m]["by_lesion_type"]}
        strongest = max(others, key=lambda m: others[m]["auprc_pooled"] or 0.0)
        ldm_ci, base_ci = (group.get("ci") or {}).get("auprc_pooled"), (others[strongest].get("ci") or {}).get(
            "auprc_pooled")
        beats = bool(ldm_ci and base_ci and ldm_ci[0] > base_ci[1])
        verdict[kind] = {"answer": beats, "strongest_baseline": strongest, "ldm_auprc": group["auprc_pooled"],
                         "ldm_ci": ldm_ci, "baseline_auprc": others[strongest]["auprc_pooled"], "baseline_ci": base_ci}
    fpr = ldm["healthy"]["fp_rate_pooled"]
    verdict["healthy_fpr"] = {"answer": fpr is not None and fpr <= factor * target_fpr, "fpr": fpr,
                              "limit": factor * target_fpr}
    return verdict


def run_ablation(out: Path, study: StudySettings, demo: DemoSettings) -> dict[str, Any]:
    """Build (or reuse) the base model in ``out/base``, choose on validation, report once on test; writes
    ``out/ablate/{validation,test}.{md,json}``."""
    from brainfm.anomaly.calibrate import calibrate
    from brainfm.anomaly.evaluate import evaluate

    base = build_base(out / "base", demo)
    folder = out / "ablate"
    pipeline = BrainFMPipeline.from_pretrained(base.out / "runs" / "ldm" / "model")
    done = folder / "validation.json"  # the folder's settings were checked: a finished selection is reused
    selection = (json.loads(done.read_bytes())["selection"] if done.is_file()
                 else select_setting(pipeline, base.shards, study, demo, cache=folder / CANDIDATES_FILE))
    rows = {**selection["rows"], **{f"baseline: {m}": r for m, r in selection["baselines"].items()}}
    validation_md = "\n\n".join([
        f"Validation anatomy only ({describe(demo)}); calibration on {selection['validation']['n_calibration']} "
        f"healthy scans, FPR on {selection['validation']['n_held_out_healthy']} other healthy scans, AUPRC on "
        f"{selection['validation']['n_lesion']} SIMULATED-lesion scans. One factor at a time: "
        + "; ".join(f"{p['factor']} -> {p['chosen']}" for p in selection["path"]) + ".",
        markdown_table(rows, [*STANDARD_COLUMNS, ("varied", "varied")], "setting", selection["chosen"]),
        f"Chosen ({selection['rule']}): {selection['chosen']}. "
        + separation_note(selection["rows"], selection["chosen"])])
    write_table(folder, "validation", validation_md, {"study": "ablate", "split": "val", **selection,
                                                      "selection": selection, "study_settings": to_dict(study),
                                                      "demo_settings": to_dict(demo)})
    # frozen: calibrate exactly as the demo does, then the one look at the test anatomy
    if not (folder / "test_report" / "metrics.json").is_file():
        pipeline.set_reconstruction(ReconstructionConfig(**selection["chosen_setting"]))
        calibrate(pipeline, base.shards, split="val", config=demo.deviation, baselines=True, atlas_split="train",
                  progress=False)
        pipeline.save_pretrained(folder / "model")
        evaluate(pipeline, base.shards, folder / "test_report", baselines=True, split="test", progress=False)
    metrics = json.loads((folder / "test_report" / "metrics.json").read_bytes())
    verdict = headline_verdict(metrics, demo.deviation.target_fpr, study.fpr_factor)
    test_rows = {m: summary(metrics[m]) for m in TEST_METHODS if m in metrics}
    lines = [f"Held-out test anatomy {'+'.join(demo.test_anatomies)}, evaluated once with the frozen setting "
             f"({selection['chosen']}); SIMULATED lesions on real anatomy.",
             markdown_table(test_rows, STANDARD_COLUMNS, "method")]
    for kind in HEADLINE_TYPES:
        v = verdict[kind]
        if v["answer"] is None:
            lines.append(f"- {kind}: {v['why']}.")
        else:
            lines.append(f"- {kind}: the LDM {'BEATS' if v['answer'] else 'does NOT beat'} the strongest baseline "
                         f"({v['strongest_baseline']}) on pooled AUPRC with non-overlapping 95 % intervals "
                         f"(LDM {cell(v['ldm_auprc'], v['ldm_ci'])}, baseline "
                         f"{cell(v['baseline_auprc'], v['baseline_ci'])}).")
    f = verdict["healthy_fpr"]
    fpr_text = "n/a" if f["fpr"] is None else f"{f['fpr']:.4f}"
    lines.append(f"- healthy false-positive rate on the held-out anatomy: {fpr_text} — "
                 f"{'within' if f['answer'] else 'ABOVE'} {study.fpr_factor:g} x the target ({f['limit']:g}).")
    write_table(folder, "test", "\n\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]),
                {"study": "ablate", "split": "test", "chosen": selection["chosen"],
                 "chosen_setting": selection["chosen_setting"], "rows": test_rows, "verdict": verdict})
    return {"selection": selection, "test": test_rows, "verdict": verdict, "folder": folder}


__all__ = ["FACTORS", "candidates", "run_ablation", "select_setting", "setting_name", "headline_verdict"]
