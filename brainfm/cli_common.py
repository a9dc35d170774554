"""What the modules of the ``brainfm`` command share: the ``--set`` option, loading a config with its overrides
and flags, loading a model folder for inference. ``brainfm.cli`` builds the one parser; subcommands that live in
their own module (``brainfm.cli_adapt``) declare their arguments with these helpers, so every subcommand reads
configs and models the same way."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from brainfm.pipeline import BrainFMPipeline


def add_overrides(parser: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE`` (repeatable): a config value overridden from the command line."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.lr=1e-4 (repeatable; relative paths are "
                             "relative to the working directory)")


def load_config_args(path: Path | None, kind: str, overrides: list[str], **flags: Any) -> Any:
    """The config at ``path`` (None: the kind's defaults) with ``--set`` overrides and explicit flags (``flags``
    maps "section.key" to a value, None = not given) merged on top."""
    from brainfm.config import CONFIG_KINDS, from_dict, load_config, merge, parse_overrides, to_dict

    given = {}
    for dotted, value in flags.items():
        if value is not None:
            section, key = dotted.split(".")
            given.setdefault(section, {})[key] = str(value) if isinstance(value, Path) else value
    merged = merge(parse_overrides(overrides), given)
    if path is None:  # overrides on top of the kind's own defaults (a section given in part keeps the rest)
        defaults = to_dict(CONFIG_KINDS[kind]())
        return from_dict(CONFIG_KINDS[kind], merge(defaults, merged), where=f"brainfm {kind} (default config)")
    return load_config(path, CONFIG_KINDS[kind], overrides=merged)


def load_pipeline(model: str, head: Path | None) -> BrainFMPipeline:
    """A model folder (or Hub repo id) on the default device, with a fine-tuned head run attached if given."""
    from brainfm.pipeline import BrainFMPipeline, default_device

    pipeline = BrainFMPipeline.from_pretrained(model).to(default_device())
    if head is not None:
        pipeline.load_head(head)
    return pipeline


__all__ = ["add_overrides", "load_config_args", "load_pipeline"]
