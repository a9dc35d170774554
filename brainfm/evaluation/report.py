"""Evaluation report: ``metrics.json`` + ``report.md`` (protocol written out, tables) + PNG figures.

Numbers without their protocol mislead (see FIELD.md: resolution, post-processing and threshold choice all move
Dice and AUPRC), so the Markdown report always starts with the protocol: grid, post-processing, how the threshold
was calibrated and the healthy false-positive target. Then the results with their 95 % intervals, every method
side by side (:func:`results_markdown`, which also writes the README's tables: ``brainfm report tables``),
sentences saying which method is best where (only where intervals do not overlap), and the circularity check.
Every file is written atomically.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from brainfm.evaluation.plots import plot_examples, plot_pr_curves
from brainfm.io import BrainFMInputError, write_json, write_text

DEFAULT_METHOD = "brainfm"
REPORT_ONLY_METHODS = ("prior_fit_check",)  # shown in the report's circularity check, never in cards or tables
METHOD_LABELS = {"ldm": "LDM", "vae_baseline": "VAE", "intensity_baseline": "intensity",
                 "atlas_baseline": "normative atlas", "prior_fit_check": "prior fit", "head": "head",
                 "ldm_site_adapted": "LDM, site-adapted"}
DETECTED_AUPRC = 0.2  # a method "detects" a lesion type when its pooled-AUPRC interval lies above this
README_BEGIN, README_END = "<!-- brainfm:results:begin -->", "<!-- brainfm:results:end -->"

TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("volumes", "n_volumes"),
    ("AUPRC pooled", "auprc_pooled"),
    ("AUPRC per-volume", "auprc_per_volume_mean"),
    ("AUROC pooled", "auroc_pooled"),
    ("AUROC per-volume", "auroc_per_volume_mean"),
    ("Dice @thr (mean)", "dice_mean"),
    ("Dice @thr (pooled)", "dice_pooled"),
    ("Dice oracle (thr)", "dice_oracle"),
    ("lesion sensitivity", "lesion_sensitivity"),
    ("lesion sens. @ 1 % healthy FP", "lesion_sensitivity_at_fp_0.01"),
    ("FP lesions / scan", "fp_lesions_per_scan"),
    ("subject AUROC", "subject_auroc"),
)


def methods_of(metrics: dict[str, Any], default_name: str = DEFAULT_METHOD) -> dict[str, dict[str, Any]]:
    """``{method: result}``: a single :meth:`MetricAccumulator.compute` result or a mapping of several, without
    the report-only methods (:data:`REPORT_ONLY_METHODS`)."""
    if "overall" in metrics:
        return {default_name: metrics}
    if metrics and all(isinstance(v, dict) and "overall" in v for v in metrics.values()):
        return {k: v for k, v in metrics.items() if k not in REPORT_ONLY_METHODS}
    raise ValueError("metrics must be one MetricAccumulator.compute() result or a {method: result} mapping")


def report_only_of(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in metrics.items() if k in REPORT_ONLY_METHODS and isinstance(v, dict)}


def write_report(
    metrics: dict[str, Any],
    protocol: dict[str, Any],
    out_dir: str | Path,
    examples: Sequence[dict[str, Any]] = (),
    title: str = "brainfm anomaly-detection evaluation",
) -> dict[str, Path | None]:
    """Write the report files into ``out_dir`` and return their paths.

    ``metrics``: one result of ``MetricAccumulator.compute()`` or several side by side, e.g.
    ``{"ldm": ..., "vae_baseline": ...}``. ``protocol``: flat dict (e.g. ``NormativeCalibration.protocol()`` plus
    ``spacing_mm``, ``dataset``), or ``{method: dict}`` when methods were calibrated separately.
    ``examples``: dicts with 2D/3D ``image``, ``reconstruction``, ``zmap``, ``pred_mask`` and optional ``label``,
    ``title``, ``threshold``.
    """
    methods = methods_of(metrics, str(protocol.get("method", DEFAULT_METHOD)))
    json.dumps(
        metrics, allow_nan=False
    )  # fail before writing anything if the metrics cannot be stored exactly
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path | None] = {
        "metrics_json": out / "metrics.json",
        "report_md": out / "report.md",
        "pr_curves_png": out / "pr_curves.png",
        "examples_png": out / "examples.png" if examples else None,
    }
    plot_pr_curves(methods, paths["pr_curves_png"])
    if examples:
        plot_examples(examples, paths["examples_png"])
    write_json(paths["metrics_json"], metrics)
    text = render_markdown(methods, protocol, title, has_examples=bool(examples),
                           report_only=report_only_of(metrics) if "overall" not in metrics else None)
    write_text(paths["report_md"], text)
    return paths


# ----------------------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------------------


def format_number(value: Any, digits: int = 4, missing: str = "n/a") -> str:
    """The one number formatter of reports, model cards and console tables: ``digits`` decimals for floats,
    integers as they are, yes/no for booleans, ``missing`` for None, sequences joined with " x "."""
    if value is None:
        return missing
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        value = float(value)
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    if isinstance(value, list | tuple):
        return " x ".join(format_number(v, digits, missing) for v in value)
    return str(value)


def protocol_lines(protocol: dict[str, Any]) -> list[str]:
    """The evaluation protocol as Markdown bullet lines: known keys as sentences, the rest verbatim."""
    p = dict(protocol)
    lines: list[str] = []
    used: set[str] = set()

    def take(*keys: str) -> list[Any]:
        used.update(keys)
        return [p.get(k) for k in keys]

    shape, spacing, resolution = take("grid_shape", "spacing_mm", "resolution")
    if shape is not None or spacing is not None or resolution is not None:
        grid = f"{' x '.join(str(int(n)) for n in shape)} voxels" if shape is not None else "native grid"
        if isinstance(spacing, list | tuple):
            grid += f" at {' x '.join(f'{float(s):g}' for s in spacing)} mm"
        elif spacing is not None:
            grid += f" at {float(spacing):g} mm"
        lines.append(f"- Evaluation grid: {grid}" + (f" ({resolution})" if resolution else ""))
    median, erosion, min_component = take("median_filter_size", "mask_erosion_vox", "min_component_vox")
    if median is not None or erosion is not None or min_component is not None:
        median_text = f"median filter {median} vox" if median and median > 1 else "no median filter"
        lines.append(
            f"- Post-processing: {median_text}; brain mask eroded by {erosion} vox; connected components "
            f"(26-connectivity) smaller than {min_component} vox removed"
        )
    normalisation, residual, sigma, floor = take(
        "normalisation", "residual", "smoothing_sigma_vox", "std_floor"
    )
    if normalisation is not None:
        details = [f"residual {residual}"] if residual else []
        if normalisation == "voxelwise" and sigma is not None:
            details.append(f"healthy mean/variance maps smoothed with Gaussian sigma {sigma} vox")
        if floor is not None:
            details.append(f"std floor {floor} x pooled healthy std")
        lines.append(f"- Normalisation: {normalisation} z-scores ({'; '.join(details)})")
    threshold, how, achieved = take("threshold", "threshold_calibration", "achieved_fpr_calibration")
    if threshold is not None:
        how_text = f", calibrated on healthy validation scans only: {how}" if how else ""
        achieved_text = (
            f" (achieved on the calibration scans: {achieved:.2%})" if achieved is not None else ""
        )
        lines.append(f"- Threshold: z > {threshold:.4f}{how_text}{achieved_text}")
    (target,) = take("target_fpr")
    if target is not None:
        lines.append(f"- Healthy false-positive target: {target:.2%} of healthy brain voxels")
    score, score_mean, score_std, n_scans = take(
        "subject_score", "healthy_subject_score_mean", "healthy_subject_score_std", "n_calibration_scans"
    )
    if score is not None:
        spread = (
            f" (healthy calibration: {format_number(score_mean)} +/- {format_number(score_std)})"
            if score_mean is not None
            else ""
        )
        lines.append(f"- Subject score: {score}{spread}")
    if n_scans is not None:
        lines.append(f"- Healthy calibration scans: {n_scans}")
    lines.extend(f"- {key}: {format_number(value)}" for key, value in p.items() if key not in used)
    return lines


def _table(rows: list[tuple[str, dict[str, Any]]], first: str) -> list[str]:
    header = [first] + [name for name, _ in TABLE_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row_name, result in rows:
        cells = [row_name]
        for _, key in TABLE_COLUMNS:
            cell = format_number(result.get(key))
            if key == "dice_oracle" and result.get("dice_oracle_threshold") is not None:
                cell += f" ({result['dice_oracle_threshold']:.3g})"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_markdown(
    methods: dict[str, dict[str, Any]], protocol: dict[str, Any], title: str, has_examples: bool = False,
    report_only: dict[str, dict[str, Any]] | None = None,
) -> str:
    """The report text; methods appear side by side in every table."""
    lines = [f"# {title}", "", "## Protocol", ""]
    named = set(methods) | set(report_only or {})
    if protocol and set(protocol) <= named and all(isinstance(v, dict) for v in protocol.values()):
        for name, method_protocol in protocol.items():
            lines += [f"### {name}", "", *protocol_lines(method_protocol), ""]
    else:
        lines += [*protocol_lines(protocol), ""]
    lines += [
        "Dice @thr uses the healthy-calibrated threshold; Dice oracle picks the threshold on the test labels "
        "(shown in brackets) and is an upper bound, not a result. Pooled metrics rank all brain voxels of all "
        "labelled volumes together; per-volume metrics average over volumes with lesion and healthy voxels.",
        "",
    ]
    for name, result in methods.items():
        lines.append(f"- {name}: {result.get('sampling', {}).get('note', 'sampling not recorded')}")
    rule = next((r.get("lesion_detection_rule") for r in methods.values() if r.get("lesion_detection_rule")), None)
    if rule:
        lines.append(f"- lesion-wise detection: {rule}")
    matched = next((r["matched_fp"] for r in methods.values() if r.get("matched_fp")), None)
    if matched:
        lines.append(f"- lesion sensitivity at a healthy false-positive rate (each method at one operating point): "
                     f"{matched['rule']}")
    lines += ["", "## Results", "", results_markdown({**methods, **(report_only or {})}).rstrip(), ""]
    lines += ["## Overall (all metrics)", "", *_table([(n, r["overall"]) for n, r in methods.items()], "method"),
              ""]
    for section, key, first in (
        ("By lesion type", "by_lesion_type", "lesion type"),
        ("By lesion size", "by_size", "size"),
    ):
        groups = sorted({g for r in methods.values() for g in r.get(key, {})}, key=_group_order)
        if not groups:
            continue
        rows = [
            (f"{group} / {name}", r[key][group])
            for group in groups
            for name, r in methods.items()
            if group in r[key]
        ]
        lines += [f"## {section}", "", *_table(rows, f"{first} / method"), ""]
    lines += [
        "## False positives on healthy scans",
        "",
        "| method | scans | FP rate pooled | per-scan mean | max |",
    ]
    lines.append("|---|---|---|---|---|")
    for name, result in methods.items():
        h = result.get("healthy", {})
        lines.append(
            f"| {name} | {format_number(h.get('n_scans'))} | {format_number(h.get('fp_rate_pooled'))} | "
            f"{format_number(h.get('fp_rate_per_scan_mean'))} | {format_number(h.get('fp_rate_per_scan_max'))} |"
        )
    lines += ["", "## Figures", "", "![precision-recall curves](pr_curves.png)"]
    if has_examples:
        lines.append("![examples: scan | reconstruction | z-map | mask vs label](examples.png)")
    return "\n".join(lines) + "\n"


def _group_order(name: str) -> tuple[int, str]:
    for rank, word in enumerate(("small", "medium", "large")):
        if name.startswith(word):
            return rank, name
    return 3, name


# ----------------------------------------------------------------------------------------------------------------
# Results with intervals: the report's and the README's tables (``brainfm report tables``)
# ----------------------------------------------------------------------------------------------------------------
HEADLINE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("AUPRC pooled", "auprc_pooled"),
    ("AUROC pooled", "auroc_pooled"),
    ("Dice @thr pooled", "dice_pooled"),
    ("lesion sensitivity", "lesion_sensitivity"),
    ("its chance level", "lesion_sensitivity_chance"),
    ("lesion sensitivity @ 1 % test healthy FP", "lesion_sensitivity_at_fp_0.01"),
    ("FP lesions / scan", "fp_lesions_per_scan"),
    ("Dice oracle", "dice_oracle"),
)


def interval_text(value: Any, interval: Sequence[float] | None, digits: int = 3) -> str:
    """``0.696 [0.610, 0.781]``: a value and its 95 % interval (the value alone where there is none)."""
    text = format_number(value, digits)
    if value is not None and interval:
        text += f" [{format_number(interval[0], digits)}, {format_number(interval[1], digits)}]"
    return text


def _label(name: str) -> str:
    return METHOD_LABELS.get(name, name)


def lesion_groups(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {"all lesions": result["overall"], **result.get("by_lesion_type", {})}


def headline(result: dict[str, Any], group: str) -> tuple[dict[str, Any] | None, str]:
    """The numbers a group is reported with, and their post-processing: the small-lesion setting (chosen on
    validation scans) for small lesion types when calibration chose one, else the default."""
    variant = (result.get("postprocessing_variants") or {}).get("small_lesion")
    settings = (variant or {}).get("settings") or {}
    if variant and group in ((settings.get("chosen_on") or {}).get("small_lesion_types") or ()):
        chosen = (variant.get("by_lesion_type") or {}).get(group)
        if chosen is not None:
            return chosen, f"small-lesion ({settings.get('variant')})"
    return lesion_groups(result).get(group), "default"


def _separated(best: dict[str, Any], other: dict[str, Any], key: str) -> bool:
    low, high = (best.get("ci") or {}).get(key), (other.get("ci") or {}).get(key)
    return bool(low and high and low[0] > high[1])


def verdicts(methods: dict[str, dict[str, Any]]) -> list[str]:
    """Per lesion group and headline metric: the best method, and whether its interval lies above every other
    method's (a clear win) or overlaps some (not separable); which methods detect each lesion type."""
    lines = []
    groups = list(dict.fromkeys(g for r in methods.values() for g in lesion_groups(r)))
    for group in groups:
        rows = {name: headline(result, group)[0] for name, result in methods.items()}
        rows = {name: row for name, row in rows.items() if row is not None}
        parts = []
        for title, key in (("pooled AUPRC", "auprc_pooled"), ("pooled Dice at the calibrated threshold",
                                                              "dice_pooled")):
            scored = {n: r for n, r in rows.items() if r.get(key) is not None}
            if not scored:
                continue
            best = max(scored, key=lambda n: scored[n][key])
            overlapping = [_label(n) for n in scored if n != best and not _separated(scored[best], scored[n], key)]
            how = ("its interval lies above every other method's" if not overlapping
                   else f"not separable from {', '.join(overlapping)} (intervals overlap)")
            value = interval_text(scored[best][key], (scored[best].get("ci") or {}).get(key))
            parts.append(f"best {title}: {_label(best)} ({value}; {how})")
        detected = [_label(n) for n, r in rows.items()
                    if ((r.get("ci") or {}).get("auprc_pooled") or [0.0])[0] >= DETECTED_AUPRC]
        if group != "all lesions":
            parts.append(f"detected (pooled-AUPRC interval above {DETECTED_AUPRC:g}) by: {', '.join(detected)}"
                         if detected else f"NOT detected by any method (no pooled-AUPRC interval above "
                                          f"{DETECTED_AUPRC:g}): not a headline claim")
        lines.append(f"- **{group}**: " + "; ".join(parts) + ".")
    return lines


def circularity(methods: dict[str, dict[str, Any]], report_only: dict[str, dict[str, Any]]) -> list[str]:
    """The prior-fit check against the LDM on all lesions: does a fit of intensity on the conditioning priors
    alone match the LDM?"""
    check, ldm = report_only.get("prior_fit_check"), methods.get("ldm")
    if check is None or ldm is None:
        return []
    a, b = ldm["overall"], check["overall"]
    if a.get("auprc_pooled") is None or b.get("auprc_pooled") is None:
        return []
    if _separated(a, b, "auprc_pooled"):
        verdict = "the LDM's interval lies above it: the LDM does more than its conditioning priors explain."
    elif _separated(b, a, "auprc_pooled"):
        verdict = "it BEATS the LDM: on this benchmark a fit on the conditioning priors alone is better."
    else:
        verdict = ("the intervals overlap: it MATCHES the LDM, so on this benchmark the LDM is not shown to do more "
                   "than a fit on its own conditioning priors.")
    return [f"- **Circularity check** (report only): a per-scan least-squares fit of intensity on the anatomy "
            f"priors the LDM is conditioned on (6 terms) scores pooled AUPRC "
            f"{interval_text(b['auprc_pooled'], (b.get('ci') or {}).get('auprc_pooled'))} on all lesions vs the "
            f"LDM's {interval_text(a['auprc_pooled'], (a.get('ci') or {}).get('auprc_pooled'))}; {verdict}"]


def results_markdown(metrics: dict[str, Any], run: dict[str, Any] | None = None) -> str:
    """Headline table (every method, 95 % intervals), post-processing table (unfiltered beside filtered), healthy
    scans (false positives, subject AUROC, pseudo-healthy faithfulness), verdicts and the circularity check, from
    an evaluation's metrics.json (plus, optionally, the demo's ``run.json``)."""
    methods = methods_of(metrics)
    report_only = report_only_of(metrics) if "overall" not in metrics else {}
    lines = []
    if run:
        lines += [f"Run: {run.get('description', '')} Wall time {run.get('wall_time', 'n/a')}"
                  + (f" ({run['stages']})." if run.get("stages") else "."), ""]
    header = ["lesions", "method", "post-processing", "volumes"] + [f"{t} [95% CI]" for t, _ in HEADLINE_COLUMNS]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    groups = list(dict.fromkeys(g for r in methods.values() for g in lesion_groups(r)))
    for group in groups:
        for name, result in methods.items():
            row, how = headline(result, group)
            if row is None:
                continue
            cells = [group, _label(name), how, format_number(row.get("n_volumes"))]
            cells += [interval_text(row.get(k), (row.get("ci") or {}).get(k)) for _, k in HEADLINE_COLUMNS]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Post-processing (pooled Dice at each setting's own healthy-calibrated threshold / pooled AUPRC):",
              "", "| lesions | method | default | unfiltered | small-lesion setting |", "|---|---|---|---|---|"]
    for group in groups:
        for name, result in methods.items():
            variants = result.get("postprocessing_variants") or {}
            cells = [group, _label(name)]
            for entry in (result, variants.get("unfiltered"), variants.get("small_lesion")):
                row = lesion_groups(entry).get(group) if entry else None
                cells.append("n/a" if row is None else f"{format_number(row.get('dice_pooled'), 3)} / "
                                                       f"{format_number(row.get('auprc_pooled'), 3)}")
            if variants.get("small_lesion"):
                cells[-1] += f" ({variants['small_lesion']['settings'].get('variant')})"
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| method | healthy scans | FP rate pooled [95% CI] | FP lesions / healthy scan | subject AUROC "
                  "(all lesions) | pseudo-healthy MAE / SSIM, healthy scans | ... lesion scans outside lesions |",
              "|---|---|---|---|---|---|---|"]
    for name, result in methods.items():
        h, overall = result.get("healthy", {}), result["overall"]
        ci, oci = h.get("ci") or {}, overall.get("ci") or {}
        auroc = (interval_text(overall.get("subject_auroc"), oci.get("subject_auroc"))
                 if overall.get("subject_auroc") is not None else f"n/a ({overall.get('subject_auroc_note')})")
        faithful = [f"{interval_text(g.get('pseudo_healthy_mae'), c.get('pseudo_healthy_mae'))} / "
                    f"{interval_text(g.get('pseudo_healthy_ssim'), c.get('pseudo_healthy_ssim'))}"
                    if g.get("pseudo_healthy_mae") is not None else "n/a" for g, c in ((h, ci), (overall, oci))]
        lines.append("| " + " | ".join([_label(name), format_number(h.get("n_scans")),
                                        interval_text(h.get("fp_rate_pooled"), ci.get("fp_rate_pooled"), 4),
                                        interval_text(h.get("fp_lesions_per_scan"), ci.get("fp_lesions_per_scan")),
                                        auroc, *faithful]) + " |")
    lines += modality_lines(methods)
    widths = []
    for group in groups:
        spans = [(_label(n), (headline(r, group)[0] or {}).get("ci", {}).get("auprc_pooled")) for n, r in methods.items()]
        spans = [f"{n} ±{(c[1] - c[0]) / 2:.3f}" for n, c in spans if c]
        if spans:
            widths.append(f"{group}: " + ", ".join(spans))
    lines += ["", "Which method is best where (a win only where its 95 % interval lies above every other's):", "",
              *verdicts(methods), *circularity(methods, report_only), "",
              "Pooled-AUPRC interval half-widths: " + "; ".join(widths) + "." if widths else ""]
    first = next(iter(methods.values()))
    if first.get("intervals"):
        info = first["intervals"]
        lines.append(f"Intervals: {info['method']}, {info['n_resamples']} resamples, seed {info['seed']}; pooled "
                     f"AUPRC inside the bootstrap from {info['histogram_bins']} shared bins (largest difference from "
                     f"the exact value: {format_number(info.get('auprc_binned_error_max'), 5)}). "
                     + (first.get("lesion_detection_rule") or "").capitalize() + ".")
    return "\n".join(lines).rstrip() + "\n"


def modality_lines(methods: dict[str, dict[str, Any]]) -> list[str]:
    """Per modality (a pooled multi-contrast model): pooled AUPRC on all lesions and per lesion type, pooled Dice
    at the calibrated threshold and the healthy false-positive rate, every method, default post-processing."""
    modalities = sorted({m for r in methods.values() for m in r.get("by_modality") or {}})
    if not modalities:
        return []
    types = list(dict.fromkeys(t for r in methods.values() for e in (r.get("by_modality") or {}).values()
                               for t in e.get("by_lesion_type", {})))
    header = ["modality", "method", "lesion volumes", "AUPRC pooled, all lesions [95% CI]",
              *(f"{t} AUPRC" for t in types), "Dice @thr pooled", "healthy scans", "FP rate pooled [95% CI]"]
    lines = ["", "Per modality (one pooled model; default post-processing; each modality's own scans):", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for modality in modalities:
        for name, result in methods.items():
            entry = (result.get("by_modality") or {}).get(modality)
            if entry is None:
                continue
            overall, healthy = entry["overall"], entry["healthy"]
            by_type = entry.get("by_lesion_type", {})
            cells = [modality, _label(name), format_number(overall.get("n_lesion_volumes")),
                     interval_text(overall.get("auprc_pooled"), (overall.get("ci") or {}).get("auprc_pooled")),
                     *(format_number((by_type.get(t) or {}).get("auprc_pooled"), 3) for t in types),
                     format_number(overall.get("dice_pooled"), 3), format_number(healthy.get("n_scans")),
                     interval_text(healthy.get("fp_rate_pooled"), (healthy.get("ci") or {}).get("fp_rate_pooled"), 4)]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def update_readme(readme: str | Path, text: str) -> bool:
    """Replace what lies between :data:`README_BEGIN` and :data:`README_END` in ``readme`` by ``text``; returns
    whether the file changed. The markers must be there, once each."""
    path = Path(readme)
    content = path.read_text(encoding="utf-8")
    if content.count(README_BEGIN) != 1 or content.count(README_END) != 1:
        raise BrainFMInputError(path, f"needs one {README_BEGIN} and one {README_END} line around the results")
    head, rest = content.split(README_BEGIN)
    _, tail = rest.split(README_END)
    updated = f"{head}{README_BEGIN}\n{text.rstrip()}\n{README_END}{tail}"
    if updated != content:
        write_text(path, updated)
    return updated != content
