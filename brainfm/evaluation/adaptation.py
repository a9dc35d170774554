"""A site adaptation (``brainfm adapt``) in numbers: what it compares before and after, and how it reads.

The record itself is written by :mod:`brainfm.anomaly.adapt` into the model's ``model_index.json``; this module
turns it into the rows of the model card and of the command's summary, so both say the same thing in the same
number format (:func:`brainfm.evaluation.report.format_number`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from brainfm.evaluation.report import format_number, interval_text

# (group, key) of evaluate()'s metrics compared before and after, with their labels
EVALUATION_KEYS: tuple[tuple[str, str, str], ...] = (
    ("overall", "dice_pooled", "lesion Dice at the calibrated threshold (pooled)"),
    ("overall", "dice_mean", "lesion Dice at the calibrated threshold (mean over scans)"),
    ("overall", "lesion_sensitivity", "lesion-wise sensitivity at the calibrated threshold"),
    ("overall", "lesion_sensitivity_chance", "its chance level (the same masks, lesions placed at random)"),
    ("overall", "lesion_sensitivity_at_fp_0.01",
     "lesion-wise sensitivity where the evaluation's healthy scans flag 1 % (both models at one operating point)"),
    ("overall", "lesion_sensitivity_at_fp_0.05", "lesion-wise sensitivity where they flag 5 %"),
    ("overall", "fp_lesions_per_scan", "false-positive lesions per scan at the calibrated threshold"),
    ("overall", "auprc_pooled", "voxel AUPRC (pooled; a threshold alone cannot move it, new statistics can)"),
    ("healthy", "fp_rate_pooled", "healthy false-positive rate of the evaluation's healthy scans"),
)


# per lesion kind, beside the pooled numbers: a threshold that stops flagging 5 % of the healthy brain loses the
# chance hits on lesions of a few voxels (MS, small-vessel disease) while the large kinds may gain, and the pooled
# lesion-wise sensitivity counts every small lesion as much as a tumour
KIND_KEYS: tuple[tuple[str, str], ...] = (("lesion_sensitivity", "lesion-wise sensitivity"),
                                          ("lesion_sensitivity_chance", "its chance level"),
                                          ("lesion_sensitivity_at_fp_0.01", "sensitivity at 1 % healthy FP"),
                                          ("dice_pooled", "lesion Dice (pooled)"))


def row_label(key: str) -> str:
    """The label of a compared number's row key (``group/metric`` or ``by_lesion_type/kind/metric``)."""
    parts = key.split("/")
    if parts[0] == "by_lesion_type" and len(parts) == 3:
        return f"{dict(KIND_KEYS).get(parts[2], parts[2])}, {parts[1]}"
    return {f"{group}/{metric}": label for group, metric, label in EVALUATION_KEYS}.get(key, key)


def compared_sections(result: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any], str, str]]:
    """(row key, metrics section, metric, label) of every number compared before and after: the pooled ones of
    :data:`EVALUATION_KEYS`, then :data:`KIND_KEYS` per lesion kind the result has."""
    rows = [(f"{group}/{key}", result.get(group) or {}, key) for group, key, _ in EVALUATION_KEYS]
    for kind, section in sorted((result.get("by_lesion_type") or {}).items()):
        rows += [(f"by_lesion_type/{kind}/{key}", section, key) for key, _ in KIND_KEYS]
    return [(key, section, metric, row_label(key)) for key, section, metric in rows]


def evaluation_summary(metrics: Mapping[str, Any]) -> dict[str, float | None]:
    """The compared numbers of one ``evaluate()`` run (its LDM result), keyed as :func:`compared_sections`."""
    result = metrics.get("ldm", metrics)
    return {key: section.get(metric) for key, section, metric, _ in compared_sections(result)}


def adaptation_rows(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(field, value) rows describing an adaptation record: data, split, training, false positives, evaluation."""
    split = record.get("split") or {}
    fp = record.get("healthy_fp_rate") or {}
    rows = [
        ("adapted from", str(record.get("source_model"))),
        ("healthy scans: adaptation part / held-out check part",
         f"{split.get('n_adapt_scans')} / {split.get('n_check_scans')} (split by subject, seed {split.get('seed')})"),
        ("scans skipped (unreadable, labelled, refused by preprocessing)", str(len(record.get("skipped") or []))),
        ("LoRA fine-tuning of the latent UNet", f"{record.get('steps')} steps, rank {record.get('lora_rank')}"
         if record.get("steps") else "none (recalibration only)"),
        ("target healthy false-positive rate", format_number(record.get("target_fpr"), 4)),
        ("threshold set on", "each adaptation scan scored against the others' statistics (leave one out)"
         if record.get("threshold_fit") == "leave_one_out" else "the adaptation scans themselves (in sample)"),
        ("healthy false-positive rate on the held-out check scans",
         f"before {format_number(fp.get('before'), 4)}, after {format_number(fp.get('after'), 4)}"),
    ]
    evaluation = record.get("evaluation") or {}
    for key, before in (evaluation.get("before") or {}).items():
        after = (evaluation.get("after") or {}).get(key)
        rows.append((f"{row_label(key)}, site evaluation",
                     f"before {format_number(before, 3)}, after {format_number(after, 3)}"))
    return rows


def before_after(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``group/key`` -> label, value and 95 % interval before and after, from two ``evaluate()`` results (one
    method each) of the same test scans."""
    compared = {}
    sections_after = {key: section for key, section, _, _ in compared_sections(after)}
    for key, section, metric, label in compared_sections(before):
        entry: dict[str, Any] = {"label": label}
        for when, chosen in (("before", section), ("after", sections_after.get(key) or {})):
            entry[when] = chosen.get(metric)
            entry[f"{when}_ci"] = (chosen.get("ci") or {}).get(metric)
        compared[key] = entry
    return compared


def before_after_markdown(summary: Mapping[str, Any]) -> str:
    """The report section of a site adaptation measured on held-out test scans: what was adapted on, then one row
    per compared number (before and after, 95 % intervals) and the held-out check part's false-positive rate."""
    record = summary["record"]
    split, fp = record.get("split") or {}, record.get("healthy_fp_rate") or {}
    training = (f"{record['steps']} LoRA steps (rank {record.get('lora_rank')}) of the latent UNet, then "
                if record.get("steps") else "")
    lines = [
        "## Site adaptation to the held-out anatomy", "",
        f"{training}recalibration on {split.get('n_adapt_scans')} healthy scans of the held-out anatomy "
        f"({', '.join(split.get('adapt_subjects') or [])}), none of them a test subject; "
        f"{split.get('n_check_scans')} more of its healthy subjects ({', '.join(split.get('check_subjects') or [])}) "
        f"held out as the adaptation's own check; target healthy false-positive rate "
        f"{format_number(record.get('target_fpr'), 4)}. Before: the model calibrated on the validation anatomy; "
        f"after: `{summary.get('model')}` (the adaptation took {format_number(summary.get('seconds'), 0)} s). The "
        "test scans are the same as above.", "",
        "| measured on | number | before [95% CI] | after [95% CI] |", "|---|---|---|---|",
        f"| adaptation's held-out check scans ({split.get('n_check_scans')}) | healthy false-positive rate (pooled) "
        f"| {format_number(fp.get('before'), 4)} | {format_number(fp.get('after'), 4)} |",
    ]
    for entry in summary["test"].values():
        digits = 4 if "false-positive rate" in entry["label"] else 3
        lines.append(f"| test scans | {entry['label']} | {interval_text(entry['before'], entry['before_ci'], digits)} "
                     f"| {interval_text(entry['after'], entry['after_ci'], digits)} |")
    return "\n".join(lines) + "\n"


def before_after_line(summary: Mapping[str, Any]) -> str:
    """One line for a run's summary: the before -> after numbers of :func:`before_after_markdown`."""
    record = summary["record"]
    split, fp = record.get("split") or {}, record.get("healthy_fp_rate") or {}
    short = {"overall/dice_pooled": "lesion Dice pooled", "overall/dice_mean": "Dice mean",
             "overall/lesion_sensitivity": "lesion-wise sensitivity",
             "overall/lesion_sensitivity_chance": "its chance level",
             "overall/lesion_sensitivity_at_fp_0.01": "sensitivity at 1 % healthy FP",
             "overall/lesion_sensitivity_at_fp_0.05": "at 5 %", "overall/auprc_pooled": "AUPRC",
             "overall/fp_lesions_per_scan": "FP lesions per scan", "healthy/fp_rate_pooled": "test healthy FP rate"}
    parts = [f"check-scan FP rate {format_number(fp.get('before'), 4)} -> {format_number(fp.get('after'), 4)}"]
    for key, entry in summary["test"].items():
        if key.startswith("by_lesion_type/"):
            continue  # the report's table has them; one line keeps to the pooled numbers
        digits = 4 if key.startswith("healthy/") else 3
        parts.append(f"{short.get(key, key)} {format_number(entry['before'], digits)} -> "
                     f"{format_number(entry['after'], digits)}")
    steps = f", {record['steps']} LoRA steps" if record.get("steps") else ""
    return (f"site adaptation ({split.get('n_adapt_scans')} healthy scans of the held-out anatomy{steps}, "
            f"{format_number(summary.get('seconds'), 0)} s; target FP rate {format_number(record.get('target_fpr'), 4)}"
            f"): " + "; ".join(parts))


def adaptation_scans(record: Mapping[str, Any]) -> list[dict[str, str]]:
    """One row per healthy scan the adaptation used: part (adapt / check), name, subject, sha256."""
    return [{"part": part, "name": str(scan.get("name")), "subject": str(scan.get("subject")),
             "sha256": str(scan.get("sha256"))}
            for part, scans in (record.get("scans") or {}).items() for scan in scans]


__all__ = ["EVALUATION_KEYS", "KIND_KEYS", "adaptation_rows", "adaptation_scans", "before_after", "before_after_line",
           "before_after_markdown", "compared_sections", "evaluation_summary", "row_label"]
