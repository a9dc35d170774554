"""How brainfm reads config data: YAML through OmegaConf, deep merges, path resolution, strict pydantic
validation and one-line errors. The schemas live beside it in the :mod:`brainfm.config` package.

Config data (YAML, JSON, ``--set`` overrides) is validated with pydantic's strict JSON rules: a number must be a
number (a quoted ``"3"``, or ``true`` where an integer is expected, is refused) and lists fill tuples; unknown keys
are refused. OmegaConf reads the YAML (its loader reads ``3e-3`` as a float, where PyYAML's YAML 1.1 rule gives
the string ``'3e-3'``) and merges layers. Every error is ONE line: ``FILE: key.path: what is wrong``.

Paths written in a config file are relative to the file's folder; paths in overrides and in configs built in code
are relative to the working directory.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path, PurePath
from typing import Annotated, Any, Literal, TypeVar

import pydantic_core
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    GetCoreSchemaHandler,
    TypeAdapter,
    ValidationError,
    create_model,
)

from brainfm.io import write_text

T = TypeVar("T")
SCHEMA = ConfigDict(extra="forbid", defer_build=True)  # for every config dataclass; deferred: see NetworkArgs


class ConfigError(ValueError):
    """A config file or mapping that does not match its schema (the message is one line)."""


# --------------------------------------------------------------------------------------------------------------
# Field markers: filesystem paths, and network constructor arguments.
# --------------------------------------------------------------------------------------------------------------


class _PathMarker:
    """Marks a ``str`` field as a filesystem path: resolved against the folder of the file that sets it."""


PATH = _PathMarker()
ConfigPath = Annotated[str, PATH]


def _as_lists(value: Any) -> Any:
    """Sequences as lists (defaults included), as a network's saved ``config.json`` holds them, so a config
    equals itself after a round trip through YAML."""
    return [_as_lists(v) for v in value] if isinstance(value, list | tuple) else value


@dataclasses.dataclass(frozen=True)
class MustExist:
    """Marks a path field whose target :func:`require_data` checks: a file, or a folder (holding ``inside``)."""

    kind: Literal["file", "dir"]
    inside: str | None = None
    hint: str = ""  # how to make it, shown in the error


class NetworkArgs:
    """Marks a field holding a network's constructor keyword arguments, as a pydantic model derived from the
    constructor's signature (names, annotations, defaults) on first use: the config never re-declares them.

    ``filled_by_caller`` are the arguments the caller derives from the data (dimensions, channel counts); they are
    not accepted in a config. The model is built lazily because building it imports the network (torch); it is
    named ``<name>Args`` in ``module``, whose ``__getattr__`` must return it (so pickle finds it).
    """

    def __init__(
        self, name: str, load: Callable[[str], type], filled_by_caller: tuple[str, ...], module: str
    ) -> None:
        self.name, self._load, self.filled_by_caller, self.module = name, load, filled_by_caller, module
        self._model: type[BaseModel] | None = None

    def model(self) -> type[BaseModel]:
        if self._model is None:
            network = self._load(self.name)
            fields: dict[str, Any] = {}
            for name, p in inspect.signature(network.__init__, eval_str=True).parameters.items():
                if (
                    name != "self"
                    and name not in self.filled_by_caller
                    and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                ):
                    annotation = Any if p.annotation is p.empty else p.annotation
                    fields[name] = (
                        Annotated[annotation, AfterValidator(_as_lists)],
                        ... if p.default is p.empty else _as_lists(p.default),
                    )
            doc = f"Keyword arguments of ``{network.__name__}``, except {self.filled_by_caller or 'none'}."
            self._model = create_model(
                f"{self.name}Args",
                __config__=ConfigDict(extra="forbid"),
                __doc__=doc,
                __module__=self.module,
                **fields,
            )
        return self._model

    def default(self) -> BaseModel:
        return self.model()()

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> Any:
        return handler(self.model())


# --------------------------------------------------------------------------------------------------------------
# Reading, merging, validating and writing configs.
# --------------------------------------------------------------------------------------------------------------


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML mapping read with OmegaConf (``${...}`` interpolations resolved); errors are ``FILE[:LINE]: ...``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        node = OmegaConf.load(path)
        data = OmegaConf.to_container(node, resolve=True)
    except yaml.MarkedYAMLError as exc:
        mark, context = exc.problem_mark or exc.context_mark, exc.context_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        text = " ".join(str(exc.problem or exc.context).split())
        if exc.context and exc.problem:
            same_line = not context or not mark or context.line == mark.line
            text += f" ({exc.context}{'' if same_line else f' started on line {context.line + 1}'})"
        raise ConfigError(f"{where}: {text}") from None
    except (yaml.YAMLError, OmegaConfBaseException) as exc:
        key = getattr(exc, "full_key", None)
        raise ConfigError(f"{path}: {f'{key}: ' if key else ''}{str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["optim.lr=1e-4", "data.batch_size=4"]`` → nested mapping (OmegaConf dotlist; values parsed as YAML)."""
    for item in items:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ConfigError(f"override {item!r}: expected KEY.PATH=VALUE")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(items)), resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"overrides {list(items)}: {str(exc).splitlines()[0]}") from None


def merge(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge (OmegaConf): later layers win key by key; lists and scalars are replaced whole."""
    try:
        merged = OmegaConf.merge(*(OmegaConf.create(_plain(dict(layer))) for layer in layers))
        return OmegaConf.to_container(merged, resolve=False)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot merge overrides: {str(exc).splitlines()[0]}") from None


def is_url(value: str) -> bool:
    """A shard location that is not a local path (``s3://...``, ``pipe:...``): never resolved or checked."""
    return "://" in value or value.startswith("pipe:")


def _union_members(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(a for a in typing.get_args(hint) if a is not type(None))
    return (hint,)


def _is_path(hint: Any) -> bool:
    return any(
        typing.get_origin(a) is Annotated and any(m is PATH for m in a.__metadata__)
        for a in _union_members(hint)
    )


def _section(hint: Any) -> tuple[Any, NetworkArgs | None]:
    """The dataclass or network-argument model a field holds (through Optional and Annotated), else None."""
    for member in _union_members(hint):
        if typing.get_origin(member) is Annotated:
            network = next((m for m in member.__metadata__ if isinstance(m, NetworkArgs)), None)
            if network is not None:
                return network.model(), network
            member = member.__origin__
        if dataclasses.is_dataclass(member):
            return member, None
    return None, None


def _field_types(schema: Any) -> dict[str, Any]:
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        return {name: field.annotation for name, field in schema.model_fields.items()}
    if dataclasses.is_dataclass(schema):
        hints = typing.get_type_hints(schema, include_extras=True)
        return {f.name: hints[f.name] for f in dataclasses.fields(schema) if f.init}
    return {}


def resolve_paths(cls: type, data: Mapping[str, Any], base: str | os.PathLike) -> dict[str, Any]:
    """A copy of ``data`` (a possibly partial mapping for ``cls``) with its relative path fields made absolute
    against ``base``; ``~`` is expanded, absolute paths and URLs (``s3://``, ``pipe:``) stay as they are."""
    out = dict(data)
    for name, hint in _field_types(cls).items():
        value = data.get(name)
        if isinstance(value, str) and value and _is_path(hint) and not is_url(value):
            out[name] = os.path.abspath(Path(base) / Path(value).expanduser())
        elif isinstance(value, Mapping) and (section := _section(hint)[0]) is not None:
            out[name] = resolve_paths(section, value, base)
    return out


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "config") -> T:
    """Validate a mapping (strict JSON rules, unknown keys refused) into ``cls``; paths are kept as given."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    try:
        raw = pydantic_core.to_json(_plain(dict(data)))
    except pydantic_core.PydanticSerializationError as exc:
        raise ConfigError(f"{where}: not plain config data ({exc})") from None
    try:
        return _adapter(cls).validate_json(raw, strict=True)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {_describe(exc, json.loads(raw), cls)}") from None


def load_config(path: str | os.PathLike, cls: type[T], overrides: Mapping[str, Any] | None = None) -> T:
    """Load a YAML file into ``cls``. Relative paths written in the file resolve against the file's folder;
    ``overrides`` (a nested mapping, e.g. from :func:`parse_overrides`) are merged on top, their relative paths
    resolved against the working directory. Errors name the file and the key path, in one line."""
    path = Path(path)
    data = resolve_paths(cls, read_yaml(path), path.absolute().parent)
    where = str(path)
    if overrides:
        data = merge(data, resolve_paths(cls, overrides, Path.cwd()))
        where += " (with overrides)"
    return from_dict(cls, data, where=where)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, BaseModel):
        return _plain(value.model_dump())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    return str(value) if isinstance(value, PurePath) else value


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain YAML/JSON-ready dict of a config (tuples become lists, network arguments become mappings)."""
    return _plain(_adapter(type(obj)).dump_python(obj, warnings=False))


class _Dumper(yaml.SafeDumper):
    """Block mappings; lists of scalars on one line (``channels: [8, 16]``), as the shipped configs write them."""


_Dumper.add_representer(
    list,
    lambda dumper, data: dumper.represent_sequence(
        "tag:yaml.org,2002:seq", data, flow_style=not any(isinstance(v, list | dict) for v in data)
    ),
)


def dump_yaml(obj: Any) -> str:
    """The config as YAML, with relative paths made absolute against the working directory."""
    data = resolve_paths(type(obj), to_dict(obj), Path.cwd())
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=110)


def save_config(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` as YAML (atomically); paths are written absolute, so the file means the same wherever it is
    read from (a config built in code has working-directory-relative paths)."""
    write_text(path, dump_yaml(obj))


def infer_kind(data: Mapping[str, Any], kinds: Mapping[str, type], where: str) -> str:
    """The kind (a key of ``kinds``) whose top-level keys hold all of ``data``'s, or failing that most of them (so
    a misspelled top-level key is reported as unknown rather than making the kind ambiguous)."""
    keys = set(data)
    overlap = {kind: len(keys & {f.name for f in dataclasses.fields(cls)}) for kind, cls in kinds.items()}
    fits = [kind for kind, n in overlap.items() if n == len(keys)]
    if not fits and max(overlap.values()) > 0:
        fits = [kind for kind, n in overlap.items() if n == max(overlap.values())]
    if len(fits) == 1:
        return fits[0]
    could = f" (could be {' or '.join(fits)})" if fits else ""
    raise ConfigError(
        f"{where}: cannot tell the config kind from its top-level keys {sorted(keys)}{could}; "
        f"name it with --kind {'|'.join(kinds)}"
    )


def require_data(config: Any, where: str) -> None:
    """Check that every path field marked :class:`MustExist` names what it should: the data a run reads. Not part
    of loading, so a cluster job's config can be checked on a machine that does not see the data."""
    problems = [f"{key}: {problem}" for key, problem in _missing_data(config, "")]
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))


def _missing_data(config: Any, prefix: str) -> Iterator[tuple[str, str]]:
    for name, hint in _field_types(type(config)).items():
        value = getattr(config, name)
        if dataclasses.is_dataclass(value):
            yield from _missing_data(value, f"{prefix}{name}.")
            continue
        need = next(
            (
                m
                for a in _union_members(hint)
                if typing.get_origin(a) is Annotated
                for m in a.__metadata__
                if isinstance(m, MustExist)
            ),
            None,
        )
        if need is None or not isinstance(value, str) or is_url(value):
            continue
        path = Path(value).absolute()
        if not path.exists():
            what = "does not exist"
        elif need.kind == "file" and not path.is_file() or need.kind == "dir" and not path.is_dir():
            what = f"is not a {'file' if need.kind == 'file' else 'folder'}"
        elif need.inside and not (path / need.inside).exists():
            what = f"has no {need.inside}"
        else:
            continue
        yield f"{prefix}{name}", f"{path} {what}" + (f" ({need.hint})" if need.hint else "")


def _key_path(loc: tuple, data: Any, missing: bool) -> tuple:
    """The keys of ``loc`` that exist in ``data`` (drops pydantic's union-member tags), plus a missing last key."""
    path: list = []
    for i, item in enumerate(loc):
        if isinstance(data, dict) and item in data or isinstance(data, list) and isinstance(item, int):
            data = data[item] if isinstance(data, dict) or 0 <= item < len(data) else None
            path.append(item)
        elif missing and i == len(loc) - 1:
            path.append(item)
    return tuple(path)


def _dotted(path: tuple) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path).lstrip(".")


def _allowed(cls: type, parent: tuple) -> str:
    schema: Any = cls
    network: NetworkArgs | None = None
    for key in parent:
        schema, network = (None, None) if isinstance(key, int) else _section(_field_types(schema).get(key))
    names = sorted(_field_types(schema)) if schema is not None else []
    if network is not None:
        by_caller = ", ".join(network.filled_by_caller)
        filled = f"; {by_caller} come from the data" if by_caller else ""
        return f"allowed ({network.name} arguments{filled}): {names}"
    return f"allowed: {names}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(exc: ValidationError, data: Any, cls: type) -> str:
    """One line for all of a ValidationError's problems: ``key.path: what is wrong; ...``."""
    unknown: dict[tuple, list[str]] = {}
    problems: dict[tuple, str] = {}
    expected: dict[tuple, tuple[list[str], Any]] = {}
    for err in exc.errors(include_url=False):
        kind = err["type"]
        path = _key_path(err["loc"], data, missing=kind in ("missing", "missing_argument"))
        if kind in ("unexpected_keyword_argument", "extra_forbidden"):
            unknown.setdefault(path[:-1], []).append(str(path[-1]))
        elif kind in ("missing", "missing_argument") and path and isinstance(path[-1], int):
            problems.setdefault(path[:-1], f"too few values (no item [{path[-1]}])")
        elif kind in ("missing", "missing_argument"):
            problems.setdefault(path, "required, not set")
        elif kind in ("too_long", "too_short"):
            problems.setdefault(path, f"{err['msg'][0].lower()}{err['msg'][1:]}")
        elif kind == "value_error":
            problems.setdefault(path, err["msg"].removeprefix("Value error, "))
        else:
            if kind == "literal_error":
                want = f"one of {err['ctx']['expected']}"
            elif kind.startswith(("dataclass", "model", "dict")):
                want = "a mapping"
            else:
                want = err["msg"].removeprefix("Input should be ").replace("a valid array", "a list")
            expected.setdefault(path, ([], err.get("input")))[0].append(want)
    lines = [(p, f"unknown key(s) {sorted(keys)}; {_allowed(cls, p)}") for p, keys in unknown.items()]
    lines += list(problems.items())
    lines += [
        (p, f"expected {' or '.join(dict.fromkeys(w))}, got {_short(got)}")
        for p, (w, got) in expected.items()
    ]
    return " ".join("; ".join(f"{_dotted(p)}: {m}" if p else m for p, m in lines).split())  # one line
