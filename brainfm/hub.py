"""Release folders for the Hugging Face Hub: assemble, validate, describe (model card), load safely, push.

A release folder is a model folder (``vae/``, ``unet/``, ``conditioner/``, ``scheduler/``,
``brainfm_config.json``, ``calibration/``) that ``brainfm.anomaly.pipeline.load_model_dir`` reads as is, plus
the Hub extras: ``model_index.json`` (diffusers layout), optional ``heads/`` and a ``README.md`` model card
rendered from the run's own files. Weights are safetensors only, and nothing in a folder is ever imported or
executed: component classes are looked up by name in an allow-list of installed ``brainfm`` and ``diffusers``
classes, so a tampered ``model_index.json`` or a stray ``pipeline.py`` cannot run code on the user's machine.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from brainfm.io import BrainFMInputError, atomic_path, write_json, write_text

log = logging.getLogger(__name__)

MODEL_COMPONENTS = ("vae", "unet", "conditioner")
SCHEDULER_COMPONENT = "scheduler"
COMPONENTS = (*MODEL_COMPONENTS, SCHEDULER_COMPONENT)
PIPELINE_CLASS_NAME = "BrainFMPipeline"
BRAINFM_CONFIG = "brainfm_config.json"
MODEL_INDEX = "model_index.json"
CARD = "README.md"
TRAINING_DATA = "training_data.json"  # counts from the shards, written by build_release
CALIBRATION_DIR = "calibration"
HEADS_DIR = "heads"
# Files that deserialize through pickle (or may) and so can run code when loaded; never shipped or read.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib", ".npy", ".npz", ".h5", ".msgpack")
CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".so", ".pyd", ".sh", ".ipynb")
# What a release may contain: configs, weights as safetensors, the card and plain text. Everything else is
# refused so an unexpected format cannot slip in under a new suffix.
ALLOWED_SUFFIXES = (".json", ".safetensors", ".md", ".txt", ".yaml", ".yml", ".csv", ".png")
# What is fetched from a Hub repo: the same list, so code and pickles never reach the disk.
HUB_ALLOW_PATTERNS = [f"*{suffix}" for suffix in ALLOWED_SUFFIXES]
TEMPLATES_DIR = Path(__file__).resolve().parents[1] / "model_cards"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
NOT_RECORDED = "not recorded"


# ------------------------------------------------------------------------------------- safe class lookup
def _allowed_class(library: str, class_name: str, where: Path) -> type:
    """Return an installed brainfm/diffusers model or scheduler class; anything else is refused.

    Only names are read from the folder; the module imported is always an installed package, never a file
    from the folder, and the class must be a diffusers ``ModelMixin`` or ``SchedulerMixin``.
    """
    from diffusers import ModelMixin, SchedulerMixin

    if not (library in ("brainfm", "diffusers") or library.startswith(("brainfm.", "diffusers."))):
        raise BrainFMInputError(
            where, f"component class {library}.{class_name} is not a brainfm or diffusers class; refusing to load it"
        )
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", class_name or ""):
        raise BrainFMInputError(where, f"invalid component class name {class_name!r}")
    try:
        module = importlib.import_module(library)
    except ImportError as exc:
        raise BrainFMInputError(where, f"component library {library!r} is not installed ({exc})") from exc
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, ModelMixin | SchedulerMixin)):
        raise BrainFMInputError(where, f"{library}.{class_name} is not a brainfm/diffusers model or scheduler class")
    return cls


# Where a class named only in a config.json may come from; submodules too, in case a class is not re-exported.
_COMPONENT_LIBRARIES = (
    "brainfm.models", "brainfm.models.vae", "brainfm.models.unet", "brainfm.models.conditioning",
    "brainfm.models.heads", "diffusers",
)


def _class_by_name(class_name: str, where: Path) -> type:
    """Find a component class named in a config.json: brainfm's models first, then diffusers'."""
    for library in _COMPONENT_LIBRARIES:
        try:
            return _allowed_class(library, class_name, where)
        except BrainFMInputError:
            continue
    raise BrainFMInputError(where, f"unknown component class {class_name!r} (not in brainfm.models or diffusers)")


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise BrainFMInputError(path, "file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BrainFMInputError(path, f"not valid JSON ({exc})") from exc


def _component_config_path(component_dir: Path) -> Path:
    name = "scheduler_config.json" if component_dir.name == SCHEDULER_COMPONENT else "config.json"
    return component_dir / name


def component_class(component_dir: Path) -> type:
    """The allow-listed class that a component folder's config names."""
    config_path = _component_config_path(component_dir)
    config = _read_json(config_path)
    class_name = config.get("_class_name") if isinstance(config, dict) else None
    if not isinstance(class_name, str):
        raise BrainFMInputError(config_path, "no '_class_name' in component config")
    return _class_by_name(class_name, config_path)


def load_component(folder: str | os.PathLike, name: str) -> Any:
    """Load one component (model or scheduler) from ``folder/name``, safetensors only, no code from the folder."""
    component_dir = Path(folder) / name
    if not component_dir.is_dir():
        raise BrainFMInputError(component_dir, "component folder missing")
    _refuse_unsafe_files(component_dir)
    cls = component_class(component_dir)
    try:
        if name == SCHEDULER_COMPONENT or _is_scheduler(cls):
            return cls.from_pretrained(component_dir)
        if not any(component_dir.glob("*.safetensors")):
            raise BrainFMInputError(component_dir, "no .safetensors weights")
        model = cls.from_pretrained(component_dir, use_safetensors=True, local_files_only=True)
    except BrainFMInputError:
        raise
    except Exception as exc:  # diffusers raises OSError/ValueError/RuntimeError for bad configs and weights
        raise BrainFMInputError(component_dir, f"cannot load {cls.__name__}: {_one_line(exc)}") from exc
    return model.eval()


def _is_scheduler(cls: type) -> bool:
    from diffusers import SchedulerMixin

    return issubclass(cls, SchedulerMixin)


def load_components(folder: str | os.PathLike) -> dict[str, Any]:
    """The four pipeline components of a model or release folder, checked and loaded safely."""
    folder = Path(folder)
    check_loadable(folder)
    return {name: load_component(folder, name) for name in COMPONENTS}


def load_heads(folder: str | os.PathLike) -> dict[str, Any]:
    """Fine-tuning heads shipped under ``heads/`` (one subfolder per head, or a single head in ``heads/``)."""
    heads_dir = Path(folder) / HEADS_DIR
    if not heads_dir.is_dir():
        return {}
    if (heads_dir / "config.json").is_file():
        return {HEADS_DIR: load_component(folder, HEADS_DIR)}
    return {
        sub.name: load_component(heads_dir, sub.name)
        for sub in sorted(heads_dir.iterdir())
        if sub.is_dir() and (sub / "config.json").is_file()
    }


# ------------------------------------------------------------------------------------------ resolution
def resolve_model_path(model: str | os.PathLike, revision: str | None = None) -> Path:
    """A local model/release folder, or a Hub repo id downloaded (configs, safetensors, card only).

    ``HF_HUB_OFFLINE=1`` is honoured by huggingface_hub: an id is then served from the local cache or fails
    with a one-line error, never a network wait.
    """
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise BrainFMInputError(path, "expected a model folder, got a file")
        return path.resolve()
    text = str(model)
    if not _REPO_ID.match(text) or text.startswith((".", "/", "~")):
        raise BrainFMInputError(text, "no such model folder (and not a Hub repo id like org/name)")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(
            repo_id=text, revision=revision, repo_type="model", allow_patterns=HUB_ALLOW_PATTERNS,
            library_name="brainfm",
        )
    except Exception as exc:  # offline, unknown repo, gated repo, network error: all one user-facing line
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        hint = " (HF_HUB_OFFLINE is set and the repo is not in the local cache)" if offline else ""
        raise BrainFMInputError(
            text, f"not a local folder and the Hub repo could not be fetched{hint}: {_one_line(exc)}"
        ) from exc
    return Path(local)


# ------------------------------------------------------------------------------------------ validation
def _refuse_unsafe_files(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            raise BrainFMInputError(path, "symbolic links are not allowed in a model folder")
        if not path.is_file():
            continue
        suffix = path.suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            raise BrainFMInputError(path, f"pickle-capable weight file ({suffix}); only .safetensors is accepted")
        if suffix in CODE_SUFFIXES:
            raise BrainFMInputError(path, "code file in a model folder; brainfm never executes code from a model")


def check_loadable(folder: str | os.PathLike) -> None:
    """Refuse a folder that is unsafe or incomplete before anything in it is read as a model.

    Checks: no pickle or code files, every component folder with its config and (for networks) safetensors,
    a ``model_index.json`` (when present) naming only allow-listed brainfm/diffusers classes.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise BrainFMInputError(folder, "model folder not found")
    _refuse_unsafe_files(folder)
    for name in COMPONENTS:
        component_dir = folder / name
        if not component_dir.is_dir():
            raise BrainFMInputError(component_dir, "component folder missing")
        config_path = _component_config_path(component_dir)
        if not config_path.is_file():
            raise BrainFMInputError(config_path, "component config missing")
        if name != SCHEDULER_COMPONENT and not any(component_dir.glob("*.safetensors")):
            raise BrainFMInputError(component_dir, "no .safetensors weights")
    index_path = folder / MODEL_INDEX
    if index_path.exists():
        index = _read_json(index_path)
        if not isinstance(index, dict) or index.get("_class_name") != PIPELINE_CLASS_NAME:
            found = index.get("_class_name") if isinstance(index, dict) else None
            raise BrainFMInputError(
                index_path, f"_class_name must be {PIPELINE_CLASS_NAME!r}, got {found!r}; custom pipelines are refused"
            )
        for key, value in index.items():
            if key.startswith("_"):
                continue
            if key not in (*COMPONENTS, HEADS_DIR):
                raise BrainFMInputError(index_path, f"unexpected component {key!r}")
            if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
                raise BrainFMInputError(index_path, f"component {key!r} must be [library, class], got {value!r}")
            declared = _allowed_class(value[0], value[1], index_path)
            if key in COMPONENTS and component_class(folder / key) is not declared:
                raise BrainFMInputError(
                    index_path, f"component {key!r} declares {value[1]} but its config names another class"
                )


def validate_release(folder: str | os.PathLike, require_card: bool = True) -> None:
    """Refuse a release that must not be published or loaded.

    On top of :func:`check_loadable`: ``model_index.json`` and ``brainfm_config.json`` present, every
    component's config loads into its class, no file of an unexpected type, and the card (``README.md``)
    parses and carries evaluation metrics in its ``model-index``.
    """
    folder = Path(folder)
    check_loadable(folder)
    for required in (MODEL_INDEX, BRAINFM_CONFIG):
        if not (folder / required).is_file():
            raise BrainFMInputError(folder / required, "missing from release")
    _read_json(folder / BRAINFM_CONFIG)
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() not in ALLOWED_SUFFIXES:
            raise BrainFMInputError(path, f"unexpected file type {path.suffix or '(none)'} in release")
    heads_dir = folder / HEADS_DIR
    head_dirs = [heads_dir] if (heads_dir / "config.json").is_file() else (
        sorted(p.parent for p in heads_dir.glob("*/config.json")) if heads_dir.is_dir() else []
    )
    for component_dir in [folder / name for name in COMPONENTS] + head_dirs:
        cls = component_class(component_dir)
        if not _is_scheduler(cls) and not any(component_dir.glob("*.safetensors")):
            raise BrainFMInputError(component_dir, "no .safetensors weights")
        try:
            config = cls.load_config(component_dir)
            cls.from_config(config)
        except Exception as exc:
            raise BrainFMInputError(
                component_dir, f"config does not load into {cls.__name__}: {_one_line(exc)}"
            ) from exc
    if require_card:
        card_metrics(folder / CARD)


def card_metrics(card_path: str | os.PathLike) -> dict[str, float]:
    """The metric values in a card's ``model-index``; refuses a card without any."""
    from huggingface_hub import ModelCard

    card_path = Path(card_path)
    if not card_path.is_file():
        raise BrainFMInputError(card_path, "model card missing")
    text = card_path.read_text()
    header = re.match(r"^---\n(.*?)\n---\n", text, flags=re.DOTALL)
    if header is None:
        raise BrainFMInputError(card_path, "model card has no YAML metadata header")
    try:
        yaml.safe_load(header.group(1))
        card = ModelCard(text, ignore_metadata_errors=False)
    except Exception as exc:
        raise BrainFMInputError(card_path, f"model card metadata does not parse: {_one_line(exc)}") from exc
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


def card_metric_values(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The metric values a card publishes in its ``model-index``, by name, read straight from metrics.json.

    For the evaluation module's format: every table metric of every group (overall, lesion type, lesion size),
    the healthy false-positive rates and the calibrated threshold; counts (``n_*``) stay in the tables only.
    Any other JSON object: its finite numeric leaves.
    """
    from brainfm.evaluation.report import TABLE_COLUMNS

    methods = _evaluation_methods(metrics)
    if methods is None:
        return flatten_metrics(metrics)
    prefix_methods = len(methods) > 1
    values: dict[str, float] = {}
    for method, result in methods.items():
        prefix = f"{method}/" if prefix_methods else ""
        for group_name, group in _metric_groups(result):
            for _, key in TABLE_COLUMNS:
                if not key.startswith("n_") and (number := _number(group.get(key))) is not None:
                    values[f"{prefix}{group_name}/{key}"] = number
        for key in _HEALTHY_FP_KEYS:
            if (number := _number((result.get("healthy") or {}).get(key))) is not None:
                values[f"{prefix}healthy/{key}"] = number
        if (number := _number(result.get("calibrated_threshold"))) is not None:
            values[f"{prefix}calibrated_threshold"] = number
    return values


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _fmt(value)
    return _short(value)


def _evaluation_tables(metrics: Mapping[str, Any]) -> tuple[str, str]:
    """(evaluation table, healthy false-positive table) as Markdown, from metrics.json only."""
    from brainfm.evaluation.report import TABLE_COLUMNS

    methods = _evaluation_methods(metrics)
    if methods is None:
        flat = flatten_metrics(metrics)
        rows = ["| metric | value |", "|---|---|", *(f"| `{k}` | {_fmt(v)} |" for k, v in flat.items())]
        pattern = re.compile(r"(^|[/_])(fp|fpr|false_pos|false_positive)", re.IGNORECASE)
        fp = [f"| `{k}` | {_fmt(v)} |" for k, v in flat.items() if pattern.search(k)]
        return "\n".join(rows), "\n".join(["| metric | value |", "|---|---|", *fp]) if fp else ""
    header = ["method", "group"] + [name for name, _ in TABLE_COLUMNS]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    fp_rows = ["| method | healthy scans | FP rate pooled | per-scan mean | per-scan max |", "|---|---|---|---|---|"]
    for method, result in methods.items():
        for group_name, group in _metric_groups(result):
            rows.append("| " + " | ".join([method, group_name] + [_cell(group.get(k)) for _, k in TABLE_COLUMNS]) + " |")
        healthy = result.get("healthy") or {}
        fp_rows.append("| " + " | ".join([method, _cell(healthy.get("n_scans"))] +
                                         [_cell(healthy.get(k)) for k in _HEALTHY_FP_KEYS]) + " |")
    has_fp = any(_number((r.get("healthy") or {}).get(k)) is not None for r in methods.values() for k in _HEALTHY_FP_KEYS)
    return "\n".join(rows), "\n".join(fp_rows) if has_fp else ""


def evaluation_protocol(metrics_path: Path | None, metrics: Mapping[str, Any], model_dir: Path) -> list[str]:
    """The protocol behind the numbers, from the run's own files, as Markdown bullet lines.

    First choice: the "Protocol" section of the ``report.md`` written beside metrics.json by the evaluation;
    then a ``protocol`` object inside metrics.json; then the model's stored calibration recipe.
    """
    report = metrics_path.parent / "report.md" if metrics_path is not None else None
    if report is not None and report.is_file():
        match = re.search(r"^## Protocol\s*\n(.*?)(?=^## |\Z)", report.read_text(), flags=re.MULTILINE | re.DOTALL)
        if match:
            lines = [line for line in match.group(1).strip().splitlines()]
            if any(line.strip() for line in lines):
                return lines
    from brainfm.evaluation.report import protocol_lines

    if isinstance(metrics.get("protocol"), Mapping):
        return protocol_lines(dict(metrics["protocol"]))
    calibration_dir = model_dir / CALIBRATION_DIR
    if (calibration_dir / "calibration.json").is_file():
        from brainfm.anomaly.deviation import NormativeCalibration

        return protocol_lines(NormativeCalibration.load(calibration_dir).protocol())
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


def _find_run_log(model_dir: Path) -> dict[str, Any]:
    """Training compute from the run's own files (steps, wall time, hardware), when the run left them."""
    candidates = [
        "training.json", "train_state.json", "run.json", "run_info.json", "trainer_state.json",
        "training_log.json", "logs/training.json", "logs/run.json",
    ]
    found: dict[str, Any] = {}
    for name in candidates:
        path = model_dir / name
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(data, dict):
                for key, value in data.items():
                    found.setdefault(key, value)
    return found


def _pick(mapping: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if key in mapping and mapping[key] not in (None, "", [], {}):
            return mapping[key]
    return None


def _loss_log_steps(source_run: Path) -> dict[str, dict[str, Any]]:
    """Steps per pretraining stage from the run's ``logs/losses.jsonl`` (last record), when the run is at hand."""
    stages: dict[str, dict[str, Any]] = {}
    for stage, folder in (("vae", source_run / "vae"), ("ldm", source_run / "ldm"), ("training", source_run)):
        log_path = folder / "logs" / "losses.jsonl"
        if not log_path.is_file():
            continue
        lines = [line for line in log_path.read_text().splitlines() if line.strip()]
        try:
            last = json.loads(lines[-1]) if lines else {}
        except json.JSONDecodeError:
            continue
        if isinstance(last, dict) and "step" in last:
            stages[stage] = {"steps": last["step"]}
    return stages


def _compute_rows(model_dir: Path, brainfm_config: Mapping[str, Any] | None = None) -> list[dict[str, str]]:
    run = _find_run_log(model_dir)
    source_run = (brainfm_config or {}).get("source_run")
    if isinstance(source_run, str) and Path(source_run).is_dir():
        for stage, info in _loss_log_steps(Path(source_run)).items():
            run.setdefault(stage, info)
    rows = []
    stages = {k: v for k, v in run.items()
              if isinstance(v, dict) and k in ("training", "vae", "ldm", "unet", "diffusion")}
    for stage, info in ({"training": run} | stages).items():
        steps = _pick(info, "steps", "global_step", "total_steps", "step")
        wall = _pick(info, "wall_time_s", "wall_seconds", "wall_time", "train_runtime", "elapsed_s")
        hardware = _pick(info, "hardware", "device", "devices", "accelerator")
        if stage == "training" and stages and steps is None and wall is None:
            continue
        rows.append({
            "stage": stage,
            "steps": str(steps) if steps is not None else NOT_RECORDED,
            "wall_time": _format_seconds(wall) if wall is not None else NOT_RECORDED,
            "hardware": _short(hardware) if hardware is not None else NOT_RECORDED,
        })
    return rows


def _format_seconds(value: Any) -> str:
    if isinstance(value, int | float):
        return f"{value:.0f} s ({value / 3600:.2f} h)" if value >= 3600 else f"{value:.1f} s"
    return str(value)


def summarize_training_data(shards_dir: str | os.PathLike) -> dict[str, Any]:
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


def _data_summary(summary: Mapping[str, Any] | None, brainfm_config: Mapping[str, Any]) -> dict[str, Any]:
    """The card's training-data facts; whatever the run did not record says so."""
    trained = brainfm_config.get("modalities")
    fallback_modalities = (
        f"{', '.join(map(str, trained))} (trained modalities; counts not recorded)" if trained else NOT_RECORDED
    )
    if not summary:
        return {"datasets": NOT_RECORDED, "subjects": NOT_RECORDED, "modalities": fallback_modalities,
                "splits": [], "simulated": False, "recipe": None}
    datasets = summary.get("datasets") or {}
    modalities = summary.get("modalities") or {}
    from brainfm.data.synthetic import HEALTHY_DATASET, LESION_DATASET

    return {
        "datasets": ", ".join(f"{name} ({count} samples)" for name, count in datasets.items()) or NOT_RECORDED,
        "subjects": str(summary.get("n_subjects", NOT_RECORDED)),
        "modalities": ", ".join(f"{name}: {count}" for name, count in modalities.items()) or fallback_modalities,
        "splits": [{"split": split, "count": str(info.get("n_samples")), "subjects": str(info.get("n_subjects")),
                    "shards": str(info.get("n_shards"))} for split, info in (summary.get("splits") or {}).items()],
        "simulated": any(name in (HEALTHY_DATASET, LESION_DATASET) or "synth" in name.lower() for name in datasets),
        "recipe": summary.get("recipe"),
    }


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"


def _dataset_name(protocol: list[str], index: Mapping[str, Any] | None) -> str:
    for line in protocol:
        match = re.match(r"^- (?:dataset|Dataset)\W+\s*(.+)$", line.strip())
        if match:
            return match.group(1).strip()
    datasets = _pick(index or {}, "datasets", "dataset")
    if isinstance(datasets, list) and datasets:
        first = datasets[0]
        return str(first.get("name", first) if isinstance(first, Mapping) else first)
    if isinstance(datasets, Mapping) and datasets:
        return str(next(iter(datasets)))
    return str(datasets) if isinstance(datasets, str) else "brainfm-evaluation"


# ----------------------------------------------------------------------------------------- model cards
@dataclasses.dataclass
class CardFacts:
    """Everything a card states, gathered from the run's files and the loaded models."""

    model_name: str
    repo_id: str | None
    license: str
    components: Mapping[str, Any]
    metrics: Mapping[str, Any]
    index: Mapping[str, Any] | None
    model_dir: Path
    brainfm_config: Mapping[str, Any]
    protocol: list[str] = dataclasses.field(default_factory=list)
    heads: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def render_card(facts: CardFacts, template: str = "foundation") -> str:
    """Render ``model_cards/<template>.md`` with the run's real values; YAML header via huggingface_hub."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from brainfm import __version__

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
    data = _data_summary(facts.index, facts.brainfm_config)
    tags = ["brainfm", "medical-imaging", "mri", "ct", "brain", "anomaly-detection", "latent-diffusion",
            "diffusers", "safetensors"]
    if data["simulated"]:
        tags.append("simulated-data")
    card_data = ModelCardData(
        model_name=facts.model_name, library_name="brainfm", license=facts.license, tags=tags,
        pipeline_tag="image-segmentation", eval_results=eval_results,
    )
    reference = facts.repo_id or str(facts.model_dir)
    components = dict(facts.components) | dict(facts.heads)
    total = sum(count_parameters(c) for c in components.values())
    template_path = TEMPLATES_DIR / f"{template}.md"
    if not template_path.is_file():
        raise BrainFMInputError(template_path, "model card template not found")
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        model_name=facts.model_name,
        reference=reference,
        package_version=__version__,
        architecture=_architecture_rows(components),
        total_parameters=f"{total:,} ({_human_count(total)})",
        data=data,
        recipe_json=json.dumps(data["recipe"] or facts.brainfm_config.get("preprocess") or {}, indent=2),
        compute=_compute_rows(facts.model_dir, facts.brainfm_config),
        eval_table=eval_table,
        fp_table=fp_table,
        protocol=facts.protocol,
        heads=sorted(facts.heads),
        threshold=_calibration_threshold(facts.brainfm_config),
    )
    text = str(card)
    if "{{" in text or "{%" in text:
        raise BrainFMInputError(template_path, "template left unrendered placeholders")
    return text + ("" if text.endswith("\n") else "\n")


def _calibration_threshold(config: Mapping[str, Any]) -> str:
    calibration = config.get("calibration") if isinstance(config.get("calibration"), Mapping) else {}
    value = _pick(calibration, "threshold") if calibration else None
    if value is None:
        value = _pick(config, "threshold")
    if isinstance(value, float):
        return f"z > {value:.4f}"
    return str(value) if value is not None else NOT_RECORDED


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


def _copy_plain_tree(source: Path, destination: Path) -> None:
    """Copy a folder of configs/safetensors, refusing anything pickle- or code-like."""
    _refuse_unsafe_files(source)
    for path in sorted(source.rglob("*")):
        if path.is_file():
            if path.suffix.lower() not in ALLOWED_SUFFIXES:
                raise BrainFMInputError(path, f"unexpected file type {path.suffix or '(none)'}; not releasable")
            target = destination / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


# Files build_release writes itself; a model folder's own copies (e.g. when re-releasing a release) are replaced.
_GENERATED = frozenset({MODEL_INDEX, BRAINFM_CONFIG, CARD, "metrics.json", TRAINING_DATA})


def _release_config(model_dir: Path, components: Mapping[str, Any], index: Mapping[str, Any] | None) -> dict:
    """The model's own brainfm_config.json, completed with what a user of the release needs to reproduce it.

    Keys already written by the training/calibration code win; only missing facts are added, so the folder
    keeps loading with ``load_model_dir``.
    """
    from brainfm import __version__

    source = model_dir / BRAINFM_CONFIG
    config = _read_json(source) if source.is_file() else {}
    if not isinstance(config, dict):
        raise BrainFMInputError(source, "expected a JSON object")
    config = dict(config)
    config.setdefault("package_version", __version__)
    if index is not None and "preprocess" not in config:
        recipe = _pick(index, "recipe", "preprocess", "preprocessing")
        if recipe is not None:
            config["preprocess"] = recipe
    conditioner_config = dict(getattr(components.get("conditioner"), "config", {}) or {})
    vocabulary = {k: v for k, v in conditioner_config.items() if not k.startswith("_") and (
        k in ("modalities", "sites", "sexes", "scalar_keys", "scalar_norms")
        or re.search(r"vocab|categor|metadata", k))}
    if vocabulary:
        config.setdefault("conditioning_vocabulary", vocabulary)
    calibration_dir = model_dir / CALIBRATION_DIR
    if (calibration_dir / "calibration.json").is_file():
        stored = _read_json(calibration_dir / "calibration.json")
        calibration = dict(config.get("calibration") or {})
        for key in ("threshold", "config", "n_scans", "achieved_fpr", "pooled_mean", "pooled_std"):
            if isinstance(stored, dict) and key in stored:
                calibration.setdefault(key, stored[key])
        calibration["arrays"] = sorted(
            str(p.relative_to(model_dir)) for p in calibration_dir.rglob("*.safetensors")
        )
        config["calibration"] = calibration
    return config


def build_release(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    metrics_path: str | os.PathLike | None = None,
    shards_dir: str | os.PathLike | None = None,
    repo_id: str | None = None,
    head_dir: str | os.PathLike | None = None,
    license: str = "apache-2.0",
    push: bool = False,
    private: bool = False,
    token: str | None = None,
) -> ReleaseSummary:
    """Assemble a Hub release folder from a model folder, atomically; optionally push it.

    Components are loaded (safetensors only, allow-listed classes) and re-saved with ``save_pretrained`` so
    the release holds exactly what the loader reads; calibration is copied verbatim. The folder is built under
    a temporary name, validated, and renamed into place only when complete.
    """
    from diffusers import __version__ as diffusers_version

    model_dir = resolve_model_path(model_dir)
    out = Path(out)
    if out.resolve() == model_dir.resolve():
        raise BrainFMInputError(out, "release folder must differ from the model folder")
    components = load_components(model_dir)
    heads: dict[str, Any] = {}
    if head_dir is not None:
        head_dir = Path(head_dir)
        if not head_dir.is_dir():
            raise BrainFMInputError(head_dir, "head folder not found")
        heads = {HEADS_DIR: load_component(head_dir.parent, head_dir.name)}
    metrics_path = Path(metrics_path) if metrics_path is not None else model_dir / "metrics.json"
    metrics = _load_metrics(metrics_path)
    index = _load_training_data(shards_dir, model_dir)
    brainfm_config = _release_config(model_dir, components, index)

    with atomic_path(out) as tmp:
        tmp.mkdir()
        for name in MODEL_COMPONENTS:
            components[name].save_pretrained(tmp / name, safe_serialization=True)
        components[SCHEDULER_COMPONENT].save_pretrained(tmp / SCHEDULER_COMPONENT)
        if heads:
            heads[HEADS_DIR].save_pretrained(tmp / HEADS_DIR, safe_serialization=True)
        if (model_dir / CALIBRATION_DIR).is_dir():
            _copy_plain_tree(model_dir / CALIBRATION_DIR, tmp / CALIBRATION_DIR)
        for extra in sorted(model_dir.iterdir()):  # recipe.json, pretrain_config.yaml, ...: shipped as they are
            if extra.is_file() and extra.name not in _GENERATED and extra.suffix.lower() in ALLOWED_SUFFIXES:
                shutil.copy2(extra, tmp / extra.name)
        model_index = {"_class_name": PIPELINE_CLASS_NAME, "_diffusers_version": diffusers_version,
                       "_brainfm_version": brainfm_config["package_version"]}
        for name in COMPONENTS:
            model_index[name] = list(_library_class(components[name]))
        if heads:
            model_index[HEADS_DIR] = list(_library_class(heads[HEADS_DIR]))
        write_json(tmp / MODEL_INDEX, model_index)
        write_json(tmp / BRAINFM_CONFIG, brainfm_config)
        write_json(tmp / "metrics.json", metrics)
        if index is not None:
            write_json(tmp / TRAINING_DATA, index)
        facts = CardFacts(
            model_name=repo_id.split("/")[-1] if repo_id else out.name, repo_id=repo_id, license=license,
            components=components, metrics=metrics, index=index, model_dir=model_dir,
            brainfm_config=brainfm_config, heads=heads,
            protocol=evaluation_protocol(metrics_path, metrics, model_dir),
        )
        write_text(tmp / CARD, render_card(facts, "foundation"))
        if heads:
            head_metrics_path = Path(head_dir) / "metrics.json"
            head_facts = facts
            if head_metrics_path.is_file():
                head_metrics = _load_metrics(head_metrics_path)
                head_facts = dataclasses.replace(
                    facts, metrics=head_metrics,
                    protocol=evaluation_protocol(head_metrics_path, head_metrics, Path(head_dir)),
                )
            head_facts = dataclasses.replace(head_facts, components={})
            write_text(tmp / HEADS_DIR / CARD, render_card(head_facts, "head"))
        validate_release(tmp)
        from brainfm.anomaly.pipeline import load_model_dir

        load_model_dir(tmp, device="cpu")  # `brainfm detect --model` must read the release as it is
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    summary = ReleaseSummary(
        path=out, parameters={k: count_parameters(v) for k, v in (components | heads).items()}, files=files
    )
    if push:
        if not repo_id:
            raise BrainFMInputError(out, "--push needs --repo-id ORG/NAME")
        summary.pushed_url = push_release(out, repo_id, private=private, token=token)
    return summary


def _library_class(module: Any) -> tuple[str, str]:
    from diffusers.pipelines.pipeline_loading_utils import _fetch_class_library_tuple

    return _fetch_class_library_tuple(module)


def _load_metrics(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise BrainFMInputError(path, "metrics.json not found; a release needs evaluation results (--metrics)")
    metrics = _read_json(path)
    if not isinstance(metrics, dict):
        raise BrainFMInputError(path, "metrics.json must be a JSON object")
    if not card_metric_values(metrics):
        raise BrainFMInputError(path, "metrics.json has no numeric metrics")
    return metrics


def _load_training_data(shards_dir: str | os.PathLike | None, model_dir: Path) -> dict[str, Any] | None:
    if shards_dir is not None:
        return summarize_training_data(shards_dir)
    stored = model_dir / TRAINING_DATA
    return _read_json(stored) if stored.is_file() else None


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
            commit_message=commit_message or f"brainfm release {time.strftime('%Y-%m-%d %H:%M:%S')}",
        )
    except Exception as exc:  # network, auth, offline mode, server errors: report, keep the local folder
        raise BrainFMInputError(
            repo_id, f"push failed ({_one_line(exc)}); the release folder {folder} is intact"
        ) from exc
    return str(getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:300]}"

