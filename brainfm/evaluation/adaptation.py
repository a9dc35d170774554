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
    ("overall", "auprc_pooled", "voxel AUPRC (pooled; a threshold alone cannot move it, new statistics can)"),
    ("healthy", "fp_rate_pooled", "healthy false-positive rate of the evaluation's healthy scans"),
)


def evaluation_summary(metrics: Mapping[str, Any]) -> dict[str, float | None]:
    """The compared numbers of one ``evaluate()`` run (its LDM result), keyed ``group/key``."""
    result = metrics.get("ldm", metrics)
    return {f"{group}/{key}": (result.get(group) or {}).get(key) for group, key, _ in EVALUATION_KEYS}


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
    labels = {f"{group}/{key}": label for group, key, label in EVALUATION_KEYS}
    for key, before in (evaluation.get("before") or {}).items():
        after = (evaluation.get("after") or {}).get(key)
        rows.append((f"{labels.get(key, key)}, site evaluation",
                     f"before {format_number(before, 3)}, after {format_number(after, 3)}"))
    return rows


def before_after(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``group/key`` -> label, value and 95 % interval before and after, from two ``evaluate()`` results (one
    method each) of the same test scans."""
    compared = {}
    for group, key, label in EVALUATION_KEYS:
        entry: dict[str, Any] = {"label": label}
        for when, result in (("before", before), ("after", after)):
            section = result.get(group) or {}
            entry[when] = section.get(key)
            entry[f"{when}_ci"] = (section.get("ci") or {}).get(key)
        compared[f"{group}/{key}"] = entry
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
        digits = 4 if "false-positive" in entry["label"] else 3
        lines.append(f"| test scans | {entry['label']} | {interval_text(entry['before'], entry['before_ci'], digits)} "
                     f"| {interval_text(entry['after'], entry['after_ci'], digits)} |")
    return "\n".join(lines) + "\n"


def before_after_line(summary: Mapping[str, Any]) -> str:
    """One line for a run's summary: the before -> after numbers of :func:`before_after_markdown`."""
    record = summary["record"]
    split, fp = record.get("split") or {}, record.get("healthy_fp_rate") or {}
    short = {"overall/dice_pooled": "lesion Dice pooled", "overall/dice_mean": "Dice mean",
             "overall/lesion_sensitivity": "lesion-wise sensitivity", "overall/auprc_pooled": "AUPRC",
             "healthy/fp_rate_pooled": "test healthy FP rate"}
    parts = [f"check-scan FP rate {format_number(fp.get('before'), 4)} -> {format_number(fp.get('after'), 4)}"]
    for key, entry in summary["test"].items():
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


__all__ = ["EVALUATION_KEYS", "adaptation_rows", "adaptation_scans", "before_after", "before_after_line",
           "before_after_markdown",
           "evaluation_summary"]
