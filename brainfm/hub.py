"""Hub releases: validate a release folder, describe it (model card), publish it.

A release folder is a model folder written by ``BrainFMPipeline.save_pretrained`` (the pipeline owns that format
and its safe loading) plus what a reader of the Hub page needs: the model card ``README.md`` rendered from the
run's own files (``metrics.json`` of the evaluation, the shard ``index.json`` for the training data), the metrics
themselves and ``training_data.json``. Nothing here reads weights from disk: a release is built from a loaded
pipeline and checked by loading it back through the pipeline class.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from brainfm.evaluation.report import format_number
from brainfm.io import BrainFMInputError, atomic_dir, check_output_dir, write_json, write_text
from brainfm.safety import (
    COMPONENTS,
    HUB_ALLOW_PATTERNS,
    HUB_IGNORE_PATTERNS,
    MODEL_INDEX,
    SCHEDULER_COMPONENT,
    check_model_folder,
    component_class,
    one_line,
    read_json,
)

CARD = "README.md"
METRICS = "metrics.json"
TRAINING_DATA = "training_data.json"  # what the model was trained on, from the shard index.json
HEAD_COMPONENT = "head"
TEMPLATES = "model_cards"  # package data (brainfm/model_cards -> the repository's model_cards/ folder)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
NOT_RECORDED = "not recorded"


# ------------------------------------------------------------------------------------------ validation
def validate_release(folder: str | os.PathLike, require_card: bool = True) -> None:
    """Refuse a release that must not be published.

    The model folder checks of :func:`brainfm.safety.check_model_folder` (safetensors only, allow-listed classes,
    weight indexes inside their folder), every component's config loads into its class, and the card
    (``README.md``) parses and carries evaluation metrics in its ``model-index``.
    """
    folder = Path(folder)
    index = check_model_folder(folder)
    for name in COMPONENTS:
        if not isinstance(index.get(name), list) or index[name][0] is None:
            continue
        component_dir = folder / name
        cls = component_class(component_dir)
        try:
            cls.from_config(cls.load_config(component_dir))
        except Exception as exc:
            raise BrainFMInputError(
                component_dir, f"config does not load into {cls.__name__}: {one_line(exc)}"
            ) from exc
    if require_card:
        card_metrics(folder / CARD)


def card_metrics(card_path: str | os.PathLike) -> dict[str, float]:
    """The metric values in a card's ``model-index``; refuses a card without any."""
    from huggingface_hub import ModelCard

    card_path = Path(card_path)
    if not card_path.is_file():
        raise BrainFMInputError(card_path, "model card missing")
    text = card_path.read_text(encoding="utf-8")
    header = re.match(r"^---\n(.*?)\n---\n", text, flags=re.DOTALL)
    if header is None:
        raise BrainFMInputError(card_path, "model card has no YAML metadata header")
    try:
        yaml.safe_load(header.group(1))
        card = ModelCard(text, ignore_metadata_errors=False)
    except Exception as exc:
        raise BrainFMInputError(card_path, f"model card metadata does not parse: {one_line(exc)}") from exc
    values: dict[str, float] = {}
    for result in card.data.eval_results or []:
        values[result.metric_type] = result.metric_value
    if not values:
        raise BrainFMInputError(card_path, "model card has no evaluation metrics (model-index is empty)")
    return values


# ----------------------------------------------------------------------------------- facts for the card
_HEALTHY_FP_KEYS = ("fp_rate_pooled", "fp_rate_per_scan_mean", "fp_rate_per_scan_max")


def _evaluation_methods(metrics: Mapping[str, Any]) -> dict[str, dict[str, Any]] | None:
    """``{method: result}`` when metrics.json is the evaluation module's format, else None."""
    from brainfm.evaluation.report import methods_of

    try:
        return methods_of(dict(metrics))
    except (ValueError, AttributeError, TypeError):
        return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Finite numeric leaves of a metrics mapping as ``a/b/c`` names; lists (curves, per-volume records) and a
    top-level ``protocol`` are description, not headline metrics."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if not prefix and key == "protocol":
            continue
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, name))
        elif (number := _number(value)) is not None:
            flat[name] = number
    return flat


def _metric_groups(result: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    groups: list[tuple[str, Mapping[str, Any]]] = [("overall", result.get("overall") or {})]
    for section in ("by_lesion_type", "by_size"):
        for name, group in (result.get(section) or {}).items():
            groups.append((f"{section}/{name}", group))
    return groups


HEADLINE_METRICS = (("overall", "auprc_pooled"), ("overall", "auroc_pooled"), ("overall", "dice_mean"),
                    ("overall", "subject_auroc"), ("healthy", "fp_rate_pooled"))


def card_metric_values(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The headline metric values a card publishes in its ``model-index``, read straight from metrics.json.

    For the evaluation module's format, per method: pooled AUPRC and AUROC, mean Dice at the calibrated
    threshold and subject AUROC over all lesions, and the pooled false-positive rate on healthy scans
    (``HEADLINE_METRICS``); every other number (lesion types, sizes, per-volume means) is in the card's tables
    and in metrics.json. Any other JSON object: its finite numeric leaves.
    """
    methods = _evaluation_methods(metrics)
    if methods is None:
        return flatten_metrics(metrics)
    prefix_methods = len(methods) > 1
    values: dict[str, float] = {}
    for method, result in methods.items():
        prefix = f"{method}/" if prefix_methods else ""
        for group, key in HEADLINE_METRICS:
            if (number := _number((result.get(group) or {}).get(key))) is not None:
                values[f"{prefix}{group}/{key}"] = number
    return values


def _cell(value: Any) -> str:
    return format_number(value) if value is None or isinstance(value, bool | int | float) else _short(value)


def _evaluation_tables(metrics: Mapping[str, Any]) -> tuple[str, str]:
    """(evaluation table, healthy false-positive table) as Markdown, from metrics.json only."""
    from brainfm.evaluation.report import TABLE_COLUMNS, interval_text

    methods = _evaluation_methods(metrics)
    if methods is None:
        flat = flatten_metrics(metrics)
        rows = ["| metric | value |", "|---|---|", *(f"| `{k}` | {format_number(v)} |" for k, v in flat.items())]
        pattern = re.compile(r"(^|[/_])(fp|fpr|false_pos|false_positive)", re.IGNORECASE)
        fp = [f"| `{k}` | {format_number(v)} |" for k, v in flat.items() if pattern.search(k)]
        return "\n".join(rows), "\n".join(["| metric | value |", "|---|---|", *fp]) if fp else ""
    header = ["method", "group"] + [name for name, _ in TABLE_COLUMNS]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    fp_rows = ["| method | healthy scans | FP rate pooled | per-scan mean | per-scan max |", "|---|---|---|---|---|"]
    for method, result in methods.items():
        for group_name, group in _metric_groups(result):
            cells = [interval_text(group.get(k), (group.get("ci") or {}).get(k), 4)
                     if isinstance(group.get(k), float) else _cell(group.get(k)) for _, k in TABLE_COLUMNS]
            rows.append("| " + " | ".join([method, group_name, *cells]) + " |")
        healthy = result.get("healthy") or {}
        fp_rows.append("| " + " | ".join([method, _cell(healthy.get("n_scans"))] +
                                         [_cell(healthy.get(k)) for k in _HEALTHY_FP_KEYS]) + " |")
    has_fp = any(_number((r.get("healthy") or {}).get(k)) is not None for r in methods.values() for k in _HEALTHY_FP_KEYS)
    return "\n".join(rows), "\n".join(fp_rows) if has_fp else ""


def evaluation_protocol(metrics_path: Path | None, metrics: Mapping[str, Any], calibration: Any = None) -> list[str]:
    """The protocol behind the numbers, from the run's own files, as Markdown bullet lines.

    First choice: the "Protocol" section of the ``report.md`` written beside metrics.json by the evaluation;
    then a ``protocol`` object inside metrics.json; then the model's calibration recipe (``calibration``).
    """
    report = metrics_path.parent / "report.md" if metrics_path is not None else None
    if report is not None and report.is_file():
        match = re.search(r"^## Protocol\s*\n(.*?)(?=^## |\Z)", report.read_text(encoding="utf-8"),
                          flags=re.MULTILINE | re.DOTALL)
        if match:
            lines = [line for line in match.group(1).strip().splitlines()]
            if any(line.strip() for line in lines):
                return lines
    from brainfm.evaluation.report import protocol_lines

    if isinstance(metrics.get("protocol"), Mapping):
        return protocol_lines(dict(metrics["protocol"]))
    if calibration is not None:
        return protocol_lines(calibration.protocol())
    return [f"- Protocol: {NOT_RECORDED}"]


def count_parameters(model: Any) -> int:
    return int(sum(p.numel() for p in model.parameters())) if hasattr(model, "parameters") else 0


def _human_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


_ARCH_KEYS = (
    "spatial_dims", "in_channels", "out_channels", "latent_channels", "channels", "num_channels",
    "block_out_channels", "num_res_blocks", "attention_levels", "num_head_channels", "cross_attention_dim",
    "with_conditioning", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
)


def _architecture_rows(components: Mapping[str, Any]) -> list[dict[str, str]]:
    rows = []
    for name, component in components.items():
        config = dict(getattr(component, "config", {}) or {})
        details = ", ".join(f"{k}={_short(config[k])}" for k in _ARCH_KEYS if k in config) or "-"
        if name == SCHEDULER_COMPONENT:
            details = ", ".join(
                f"{k}={_short(config[k])}" for k in ("num_train_timesteps", "beta_schedule", "prediction_type")
                if k in config
            ) or "-"
        n = count_parameters(component)
        rows.append({
            "component": name, "class": type(component).__name__, "parameters": f"{n:,}" if n else "-",
            "details": details,
        })
    return rows


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | tuple | dict) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _loss_log(log_path: Path) -> dict[str, Any] | None:
    """Steps (last record) and wall time (first to last record) of one stage's ``logs/losses.jsonl``."""
    records = []
    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    records = [r for r in records if isinstance(r, dict) and "step" in r]
    if not records:
        return None
    times = [r.get("time") for r in (records[0], records[-1])]
    wall = times[1] - times[0] if all(isinstance(t, int | float) for t in times) and len(records) > 1 else None
    return {"steps": records[-1]["step"], "wall_time_s": wall}


def _compute_rows(provenance: Mapping[str, Any]) -> list[dict[str, str]]:
    """Per pretraining stage: the compute record the model folder carries (``provenance.training_compute``), else
    the run's ``compute.json``, else steps and wall time from its loss log; what was not recorded says so."""
    from brainfm.train.compute import card_row, format_seconds, read_compute

    rows = []
    carried = provenance.get("training_compute") or {}
    source_run = provenance.get("source_run")
    run = Path(source_run) if isinstance(source_run, str) and Path(source_run).is_dir() else None
    for stage in ("vae", "ldm"):
        record = carried.get(stage) or (read_compute(run / stage) if run is not None else None)
        if record:
            rows.append(card_row(stage, record))
            continue
        log_path = run / stage / "logs" / "losses.jsonl" if run is not None else None
        info = _loss_log(log_path) if log_path is not None and log_path.is_file() else None
        if info is not None:
            wall = info["wall_time_s"]
            rows.append({**_UNRECORDED_COMPUTE, "stage": stage, "steps": str(info["steps"]),
                         "wall_time": format_seconds(wall) if wall is not None else NOT_RECORDED})
    return rows or [{**_UNRECORDED_COMPUTE, "stage": "training"}]


_UNRECORDED_COMPUTE = {key: NOT_RECORDED for key in ("steps", "wall_time", "steps_per_s", "samples_per_s", "setup",
                                                     "hardware")}


def training_data_summary(shards_dir: str | os.PathLike) -> dict[str, Any]:
    """What the model was trained on, from a shard folder's ``index.json`` alone (splits, recipe, and the
    per-split counts by dataset and modality the writer stores); no tar file is opened."""
    from brainfm.data.writer import load_index

    index = load_index(shards_dir)
    datasets: dict[str, int] = {}
    modalities: dict[str, int] = {}
    splits: dict[str, dict[str, int]] = {}
    for split, counts in index["counts"].items():
        for name, n in counts["datasets"].items():
            datasets[name] = datasets.get(name, 0) + n
        for name, n in counts["modalities"].items():
            modalities[name] = modalities.get(name, 0) + n
        splits[split] = {key: counts[key] for key in ("n_samples", "n_shards", "n_subjects")}
    return {
        "source": str(Path(shards_dir) / "index.json" if Path(shards_dir).is_dir() else shards_dir),
        "datasets": datasets,
        "modalities": modalities,
        "splits": splits,
        "n_subjects": sum(info["n_subjects"] for info in splits.values()),  # a subject is in one split only
        "recipe": index.get("recipe"),
        "grid_shape": index.get("grid_shape"),
        "n_rejected": index.get("n_rejected"),
    }


def _listing(tally: Mapping[str, int], unit: str = "") -> str:
    return ", ".join(f"{name}{unit.format(count)}" for name, count in tally.items())


def _data_summary(summary: Mapping[str, Any] | None, config: Mapping[str, Any]) -> dict[str, Any]:
    """The card's training-data facts; whatever the run did not record says so."""
    trained = config.get("modalities")
    fallback_modalities = (
        f"{', '.join(map(str, trained))} (trained modalities; counts not recorded)" if trained else NOT_RECORDED
    )
    if not summary:
        return {"datasets": NOT_RECORDED, "subjects": NOT_RECORDED, "modalities": fallback_modalities,
                "splits": [], "simulated": False, "recipe": None}
    datasets = summary.get("datasets") or {}
    modalities = summary.get("modalities") or {}
    from brainfm.data.synthetic import HEALTHY_DATASET, LESION_DATASET

    subjects = summary.get("n_subjects")
    return {
        "datasets": _listing(datasets, " ({} samples)") or NOT_RECORDED,
        "subjects": str(subjects) if subjects is not None else NOT_RECORDED,
        "modalities": _listing(modalities, ": {}") or fallback_modalities,
        "splits": [{"split": split, **{key: NOT_RECORDED if info.get(field) is None else str(info[field])
                                       for key, field in (("count", "n_samples"), ("subjects", "n_subjects"),
                                                          ("shards", "n_shards"))}}
                   for split, info in (summary.get("splits") or {}).items()],
        "simulated": any(name in (HEALTHY_DATASET, LESION_DATASET) or "synth" in name.lower() for name in datasets),
        "recipe": summary.get("recipe"),
    }


def _dataset_name(protocol: list[str], index: Mapping[str, Any] | None) -> str:
    for line in protocol:
        match = re.match(r"^- (?:dataset|Dataset)\W+\s*(.+)$", line.strip())
        if match:
            return match.group(1).strip()
    return next(iter((index or {}).get("datasets") or {}), "brainfm-evaluation")


# ----------------------------------------------------------------------------------------- model cards
@dataclasses.dataclass
class CardFacts:
    """Everything a card states, gathered from the run's files and the loaded pipeline."""

    model_name: str
    repo_id: str | None
    license: str
    components: Mapping[str, Any]
    metrics: Mapping[str, Any]
    index: Mapping[str, Any] | None
    location: str  # where the model lives when there is no repo id
    config: Mapping[str, Any]  # the pipeline's registered configuration (model_index.json)
    protocol: list[str] = dataclasses.field(default_factory=list)


def template_text(template: str) -> str:
    """A card template shipped as package data (so wheel installs render cards as editable ones do)."""
    try:
        return resources.files("brainfm").joinpath(TEMPLATES, f"{template}.md").read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise BrainFMInputError(f"brainfm/{TEMPLATES}/{template}.md", "model card template not found") from exc


def render_card(facts: CardFacts, template: str = "foundation") -> str:
    """Render ``model_cards/<template>.md`` with the run's real values; YAML header via huggingface_hub."""
    import tempfile

    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from brainfm.version import __version__

    values = card_metric_values(facts.metrics)
    if not values:
        raise BrainFMInputError(None, "metrics.json has no finite numeric metric to report in the model card")
    dataset_name = _dataset_name(facts.protocol, facts.index)
    dataset_type = re.sub(r"[^a-z0-9._-]+", "-", dataset_name.lower()).strip("-") or "brainfm-evaluation"
    eval_results = [
        EvalResult(task_type="image-segmentation", task_name="unsupervised anomaly segmentation",
                   dataset_type=dataset_type, dataset_name=dataset_name, metric_type=name, metric_name=name,
                   metric_value=value)
        for name, value in values.items()
    ]
    eval_table, fp_table = _evaluation_tables(facts.metrics)
    data = _data_summary(facts.index, facts.config)
    tags = ["brainfm", "medical-imaging", "mri", "ct", "brain", "anomaly-detection", "latent-diffusion",
            "diffusers", "safetensors"]
    if data["simulated"]:
        tags.append("simulated-data")
    card_data = ModelCardData(
        model_name=facts.model_name, library_name="brainfm", license=facts.license, tags=tags,
        pipeline_tag="image-segmentation", eval_results=eval_results,
    )
    components = {k: v for k, v in facts.components.items() if v is not None}
    total = sum(count_parameters(c) for c in components.values())
    with tempfile.TemporaryDirectory(prefix="brainfm-card-") as tmp:  # huggingface_hub renders from a path
        template_path = Path(tmp) / f"{template}.md"
        template_path.write_text(template_text(template), encoding="utf-8")
        card = ModelCard.from_template(
            card_data,
            template_path=str(template_path),
            model_name=facts.model_name,
            reference=facts.repo_id or facts.location,
            package_version=__version__,
            architecture=_architecture_rows(components),
            total_parameters=f"{total:,} ({_human_count(total)})",
            data=data,
            recipe_json=json.dumps(data["recipe"] or facts.config.get("recipe") or {}, indent=2),
            compute=_compute_rows(facts.config.get("provenance") or {}),
            eval_table=eval_table,
            fp_table=fp_table,
            protocol=facts.protocol,
            has_head=HEAD_COMPONENT in components,
            threshold=_calibration_threshold(facts.config),
            adaptation=_adaptation(facts.config.get("adaptation")),
        )
    text = str(card)
    if "{{" in text or "{%" in text:
        raise BrainFMInputError(f"brainfm/{TEMPLATES}/{template}.md", "template left unrendered placeholders")
    return text + ("" if text.endswith("\n") else "\n")


def _adaptation(record: Any) -> dict[str, Any] | None:
    """The site adaptation ``brainfm adapt`` recorded in model_index.json, as the card's rows."""
    from brainfm.evaluation.adaptation import adaptation_rows, adaptation_scans

    return {"rows": adaptation_rows(record), "scans": adaptation_scans(record)} if isinstance(record, Mapping) else None


def _calibration_threshold(config: Mapping[str, Any]) -> str:
    value = (config.get("calibration_info") or {}).get("threshold")
    return f"z > {value:.4f}" if isinstance(value, float) else NOT_RECORDED


# --------------------------------------------------------------------------------------------- release
@dataclasses.dataclass
class ReleaseSummary:
    path: Path
    parameters: dict[str, int]
    files: list[str]
    pushed_url: str | None = None

    def summary(self) -> str:
        params = ", ".join(f"{k}={_human_count(v)}" for k, v in self.parameters.items() if v)
        return f"release {self.path}: {len(self.files)} files; parameters {params}" + (
            f"; pushed to {self.pushed_url}" if self.pushed_url else ""
        )


def build_release(
    pipeline: Any,
    out: str | os.PathLike,
    metrics_path: str | os.PathLike | None = None,
    shards_dir: str | os.PathLike | None = None,
    repo_id: str | None = None,
    license: str = "apache-2.0",
    push: bool = False,
    private: bool = False,
    token: str | None = None,
    head_metrics_path: str | os.PathLike | None = None,
) -> ReleaseSummary:
    """Write a Hub release of a loaded ``BrainFMPipeline`` into ``out``, atomically; optionally push it.

    The model folder is the pipeline's own ``save_pretrained`` output; the card is rendered from the evaluation's
    ``metrics.json`` (default: the model folder's) and the shard ``index.json``. The folder is validated and
    loaded back through the pipeline class before it appears at ``out``; ``out`` must be new, empty, or an
    earlier release brainfm wrote (only its files are replaced).
    """
    model_dir = Path(pipeline.model_dir) if pipeline.model_dir is not None else None
    out = Path(out)
    if model_dir is not None and out.resolve() == model_dir.resolve():
        raise BrainFMInputError(out, "release folder must differ from the model folder")
    check_output_dir(out)
    if metrics_path is None:
        if model_dir is None:
            raise BrainFMInputError(out, "a release needs evaluation results (metrics_path)")
        metrics_path = model_dir / METRICS
    metrics_path = Path(metrics_path)
    metrics = _load_metrics(metrics_path)
    if push and not repo_id:
        raise BrainFMInputError(out, "--push needs --repo-id ORG/NAME")
    index = _load_training_data(shards_dir, model_dir)
    head_metrics_path = Path(head_metrics_path) if head_metrics_path is not None else None
    head_metrics = _load_metrics(head_metrics_path) if head_metrics_path is not None else None

    with atomic_dir(out) as tmp:
        pipeline.write_to(tmp)
        config = read_json(tmp / MODEL_INDEX)
        write_json(tmp / METRICS, metrics)
        if index is not None:
            write_json(tmp / TRAINING_DATA, index)
        facts = CardFacts(
            model_name=repo_id.split("/")[-1] if repo_id else out.name, repo_id=repo_id, license=license,
            components=pipeline.components, metrics=metrics, index=index, location=str(out), config=config,
            protocol=evaluation_protocol(metrics_path, metrics, pipeline.calibration),
        )
        write_text(tmp / CARD, render_card(facts, "foundation"))
        if pipeline.head is not None:
            head_facts = dataclasses.replace(facts, components={HEAD_COMPONENT: pipeline.head})
            if head_metrics is not None:
                head_facts = dataclasses.replace(head_facts, metrics=head_metrics,
                                                 protocol=evaluation_protocol(head_metrics_path, head_metrics))
            write_text(tmp / HEAD_COMPONENT / CARD, render_card(head_facts, "head"))
        validate_release(tmp)
        type(pipeline).from_pretrained(tmp)  # `brainfm detect --model RELEASE` must read it as it is
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    summary = ReleaseSummary(
        path=out, files=files,
        parameters={k: count_parameters(v) for k, v in pipeline.components.items() if v is not None},
    )
    if push:
        summary.pushed_url = push_release(out, repo_id, private=private, token=token)
    return summary


def _load_metrics(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise BrainFMInputError(path, "metrics.json not found; a release needs evaluation results (--metrics)")
    metrics = read_json(path)
    if not isinstance(metrics, dict):
        raise BrainFMInputError(path, "metrics.json must be a JSON object")
    if not card_metric_values(metrics):
        raise BrainFMInputError(path, "metrics.json has no numeric metrics")
    return metrics


def _load_training_data(shards_dir: str | os.PathLike | None, model_dir: Path | None) -> dict[str, Any] | None:
    if shards_dir is not None:
        return training_data_summary(shards_dir)
    stored = model_dir / TRAINING_DATA if model_dir is not None else None
    return read_json(stored) if stored is not None and stored.is_file() else None


# ------------------------------------------------------------------------------------------------ push
def push_release(
    folder: str | os.PathLike, repo_id: str, private: bool = False, token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Create the repo (if needed) and upload the validated folder in one commit; the folder is never touched.

    Any failure (no network, no token, refused permission) becomes a one-line :class:`BrainFMInputError`.
    """
    from huggingface_hub import HfApi, ModelCard

    folder = Path(folder)
    validate_release(folder)
    if not _REPO_ID.match(repo_id):
        raise BrainFMInputError(repo_id, "repo id must look like ORG/NAME")
    token = token or os.environ.get("HF_TOKEN") or None
    try:
        ModelCard.load(folder / CARD).validate()
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), repo_type="model", allow_patterns=HUB_ALLOW_PATTERNS,
            ignore_patterns=HUB_IGNORE_PATTERNS,
            commit_message=commit_message or f"brainfm release {time.strftime('%Y-%m-%d %H:%M:%S')}",
        )
    except Exception as exc:  # network, auth, offline mode, server errors: report, keep the local folder
        raise BrainFMInputError(
            repo_id, f"push failed ({one_line(exc)}); the release folder {folder} is intact"
        ) from exc
    return str(getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}")
