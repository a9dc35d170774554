"""A site adaptation (``brainfm adapt``) in numbers: what it compares before and after, and how it reads.

The record itself is written by :mod:`brainfm.anomaly.adapt` into the model's ``model_index.json``; this module
turns it into the rows of the model card and of the command's summary, so both say the same thing in the same
number format (:func:`brainfm.evaluation.report.format_number`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from brainfm.evaluation.report import format_number

# (group, key) of evaluate()'s metrics compared before and after, with their labels
EVALUATION_KEYS: tuple[tuple[str, str, str], ...] = (
    ("overall", "dice_pooled", "lesion Dice at the calibrated threshold (pooled)"),
    ("overall", "dice_mean", "lesion Dice at the calibrated threshold (mean over scans)"),
    ("overall", "auprc_pooled", "voxel AUPRC (pooled; a threshold change cannot move it)"),
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


def adaptation_scans(record: Mapping[str, Any]) -> list[dict[str, str]]:
    """One row per healthy scan the adaptation used: part (adapt / check), name, subject, sha256."""
    return [{"part": part, "name": str(scan.get("name")), "subject": str(scan.get("subject")),
             "sha256": str(scan.get("sha256"))}
            for part, scans in (record.get("scans") or {}).items() for scan in scans]


__all__ = ["EVALUATION_KEYS", "adaptation_rows", "adaptation_scans", "evaluation_summary"]
