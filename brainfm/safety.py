"""What brainfm reads from a model folder or a Hub repo, and how: configs and safetensors only, never code.

A model folder (``BrainFMPipeline.save_pretrained``) is::

    model_index.json                        pipeline config: component classes, recipe, modalities, settings
    vae/ unet/ conditioner/ [head/]         config.json + *.safetensors (+ a safetensors shard index)
    noise_scheduler/                        scheduler_config.json
    calibration/ [head_lora/]               JSON + safetensors
    README.md, metrics.json, ...            a release's card and evaluation (JSON / Markdown only)

Classes are looked up by name in an allow-list of installed ``brainfm`` and ``diffusers`` modules; nothing in the
folder is imported or executed, no pickle is ever opened (a weight index may only name ``.safetensors`` files of
its own component folder), and a Hub download fetches only the file types above.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path
from typing import Any

from brainfm.io import MANIFEST_NAME, BrainFMInputError

PIPELINE_CLASS_NAME = "BrainFMPipeline"
MODEL_INDEX = "model_index.json"
MODEL_COMPONENTS = ("vae", "unet", "conditioner")
SCHEDULER_COMPONENT = "noise_scheduler"
REQUIRED_COMPONENTS = (*MODEL_COMPONENTS, SCHEDULER_COMPONENT)
OPTIONAL_COMPONENTS = ("head",)
COMPONENTS = (*REQUIRED_COMPONENTS, *OPTIONAL_COMPONENTS)
MODEL_CONFIG = "config.json"
SCHEDULER_CONFIG = "scheduler_config.json"
WEIGHTS_INDEX_SUFFIX = ".safetensors.index.json"
# Never read by a loader: a head's own model card, and the settings copy a head training run keeps beside its
# weights (the model folder itself stores head settings in model_index.json).
COMPONENT_EXTRAS = ("README.md", "head_config.json")
# Files that deserialize through pickle (or may) and so can run code when loaded: never shipped or read.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib", ".npy", ".npz", ".h5", ".msgpack")
CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".so", ".pyd", ".sh", ".ipynb")
# Everything the folder format needs: configs and settings, weights, the card. Nothing else is read or fetched.
ALLOWED_SUFFIXES = (".json", ".safetensors", ".md")
HUB_ALLOW_PATTERNS = [f"*{suffix}" for suffix in ALLOWED_SUFFIXES]
HUB_IGNORE_PATTERNS = [MANIFEST_NAME, f"*/{MANIFEST_NAME}"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Where a class named only in a config.json may come from; submodules too, in case a class is not re-exported.
_COMPONENT_LIBRARIES = (
    "brainfm.models", "brainfm.models.vae", "brainfm.models.unet", "brainfm.models.conditioning",
    "brainfm.models.heads", "diffusers",
)


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:300]}"


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise BrainFMInputError(path, "file not found")
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BrainFMInputError(path, f"not valid JSON ({exc})") from exc


# ------------------------------------------------------------------------------------- safe class lookup
def allowed_class(library: str, class_name: str, where: Path) -> type:
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


def class_by_name(class_name: str, where: Path) -> type:
    """Find a component class named in a config.json: brainfm's models first, then diffusers'."""
    for library in _COMPONENT_LIBRARIES:
        try:
            return allowed_class(library, class_name, where)
        except BrainFMInputError:
            continue
    raise BrainFMInputError(where, f"unknown component class {class_name!r} (not in brainfm.models or diffusers)")


def is_scheduler(cls: type) -> bool:
    from diffusers import SchedulerMixin

    return issubclass(cls, SchedulerMixin)


def component_config_path(component_dir: Path) -> Path:
    """``scheduler_config.json`` for a scheduler folder, ``config.json`` for a network; never both."""
    model, scheduler = component_dir / MODEL_CONFIG, component_dir / SCHEDULER_CONFIG
    if model.is_file() and scheduler.is_file():
        raise BrainFMInputError(component_dir, "holds both config.json and scheduler_config.json")
    if not (model.is_file() or scheduler.is_file()):
        raise BrainFMInputError(component_dir / MODEL_CONFIG, "component config missing")
    return scheduler if scheduler.is_file() else model


def component_class(component_dir: Path) -> type:
    """The allow-listed class that a component folder's config names."""
    config_path = component_config_path(component_dir)
    config = read_json(config_path)
    class_name = config.get("_class_name") if isinstance(config, dict) else None
    if not isinstance(class_name, str):
        raise BrainFMInputError(config_path, "no '_class_name' in component config")
    cls = class_by_name(class_name, config_path)
    if is_scheduler(cls) != (config_path.name == SCHEDULER_CONFIG):
        raise BrainFMInputError(config_path, f"{class_name} does not belong in a {config_path.name}")
    return cls


# ------------------------------------------------------------------------------------------ file checks
def refuse_unsafe_files(folder: Path) -> None:
    """No symbolic link, pickle-capable file, code file or file of a type the format does not use."""
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
        if suffix not in ALLOWED_SUFFIXES:
            raise BrainFMInputError(path, f"unexpected file type {path.suffix or '(none)'} in a model folder "
                                          f"(allowed: {', '.join(ALLOWED_SUFFIXES)})")


def check_weight_index(index_path: Path) -> None:
    """A sharded-weights index may only point at ``.safetensors`` files that sit in its own folder."""
    if not index_path.name.endswith(WEIGHTS_INDEX_SUFFIX):
        raise BrainFMInputError(index_path, "weight index for a non-safetensors format; only .safetensors is "
                                            "accepted")
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise BrainFMInputError(index_path, "weight index without a 'weight_map'")
    for shard in sorted({str(v) for v in weight_map.values()}):
        target = index_path.parent / shard
        if (Path(shard).name != shard or not shard.endswith(".safetensors") or not target.is_file()
                or target.is_symlink()):
            raise BrainFMInputError(index_path, f"weight_map entry {shard!r} is not a .safetensors file in "
                                                f"{index_path.parent.name}/; refusing to load it")


def check_component_files(component_dir: Path) -> type:
    """Everything a loader could read from one component folder is a config, safetensors or a checked index;
    networks have weights. Returns the component's allow-listed class."""
    if not component_dir.is_dir() or component_dir.is_symlink():
        raise BrainFMInputError(component_dir, "component folder missing")
    refuse_unsafe_files(component_dir)
    cls = component_class(component_dir)
    config_name = component_config_path(component_dir).name
    for path in sorted(component_dir.rglob("*")):
        if not path.is_file() or path.name in (config_name, *COMPONENT_EXTRAS, MANIFEST_NAME):
            continue
        if path.parent != component_dir:
            raise BrainFMInputError(path, "unexpected file inside a component folder")
        if path.name.endswith(".index.json"):
            check_weight_index(path)
        elif path.suffix.lower() != ".safetensors" or is_scheduler(cls):
            raise BrainFMInputError(path, "unexpected file in a component folder (configs and .safetensors only)")
    if not is_scheduler(cls) and not any(component_dir.glob("*.safetensors")):
        raise BrainFMInputError(component_dir, "no .safetensors weights")
    return cls


def load_component(component_dir: str | os.PathLike) -> Any:
    """Load one component (network or scheduler) after :func:`check_component_files`; safetensors only."""
    component_dir = Path(component_dir)
    cls = check_component_files(component_dir)
    try:
        if is_scheduler(cls):
            return cls.from_pretrained(component_dir)
        model = cls.from_pretrained(component_dir, use_safetensors=True, local_files_only=True)
    except Exception as exc:  # diffusers raises OSError/ValueError/RuntimeError for bad configs and weights
        raise BrainFMInputError(component_dir, f"cannot load {cls.__name__}: {one_line(exc)}") from exc
    return model.eval()


def check_model_folder(folder: str | os.PathLike) -> dict[str, Any]:
    """Refuse a folder that is unsafe or incomplete before anything in it is read as a model; returns its
    ``model_index.json``. Checks every file (no pickle, code or unknown type), every component folder, and that
    ``model_index.json`` names this pipeline and only allow-listed classes that match the component configs."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BrainFMInputError(folder, "model folder not found")
    refuse_unsafe_files(folder)
    index_path = folder / MODEL_INDEX
    if not index_path.is_file():
        raise BrainFMInputError(index_path, "not a brainfm model folder (model_index.json missing)")
    index = read_json(index_path)
    if not isinstance(index, dict) or index.get("_class_name") != PIPELINE_CLASS_NAME:
        found = index.get("_class_name") if isinstance(index, dict) else None
        raise BrainFMInputError(
            index_path, f"_class_name must be {PIPELINE_CLASS_NAME!r}, got {found!r}; custom pipelines are refused"
        )
    for name in REQUIRED_COMPONENTS:
        if name not in index:
            raise BrainFMInputError(index_path, f"component {name!r} missing from model_index.json")
    for key, value in index.items():
        if key not in COMPONENTS:
            continue
        if key in OPTIONAL_COMPONENTS and value in ([None, None], (None, None), None):
            if (folder / key).exists():
                raise BrainFMInputError(folder / key, f"folder present but model_index.json has no {key!r}")
            continue
        if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
            raise BrainFMInputError(index_path, f"component {key!r} must be [library, class], got {value!r}")
        declared = allowed_class(value[0], value[1], index_path)
        if check_component_files(folder / key) is not declared:
            raise BrainFMInputError(
                index_path, f"component {key!r} declares {value[1]} but its config names another class"
            )
    return index


# ------------------------------------------------------------------------------------------ resolution
def resolve_model_path(model: str | os.PathLike, revision: str | None = None) -> Path:
    """A local model folder, or a Hub repo id downloaded (configs, safetensors and the card only).

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
            ignore_patterns=HUB_IGNORE_PATTERNS, library_name="brainfm",
        )
    except Exception as exc:  # offline, unknown repo, gated repo, network error: all one user-facing line
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        hint = " (HF_HUB_OFFLINE is set and the repo is not in the local cache)" if offline else ""
        raise BrainFMInputError(
            text, f"not a local folder and the Hub repo could not be fetched{hint}: {one_line(exc)}"
        ) from exc
    return Path(local)
