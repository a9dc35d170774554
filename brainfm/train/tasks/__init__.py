"""The ``Task`` protocol: what a training job gives the :class:`~brainfm.train.trainer.Trainer`.

The trainer owns what every job shares (distributed set-up, accumulation, clipping, the non-finite guard, EMA,
LR schedules, checkpoints, logs, previews); a task owns what differs: which networks train with which optimizer
(``objectives``), on which loss (``losses``), from which data (``make_stream``), and what it leaves behind
(``export``). ``brainfm.train.tasks.vae`` and ``.ldm`` hold the two pretraining stages; the fine-tuning heads
(``brainfm.finetune.task.HeadTask``) implement the same protocol.

This module imports nothing of its implementations, so they import it without a cycle.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler

from brainfm.config import OptimConfig

if TYPE_CHECKING:
    from accelerate import Accelerator

Batch = dict[str, Any]
"""One batch: tensors keyed by name plus per-sample ``meta`` dicts (the reader's and the tasks' own format)."""


class Stateful(Protocol):
    """Anything whose state travels with checkpoints (``accelerator.register_for_checkpointing``)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Stream(Stateful, Protocol):
    """An endless, resumable batch source: ``state_dict`` is this rank's position, restored exactly on resume."""

    def next(self) -> Batch: ...


@dataclass
class Objective:
    """One trained model with its optimizer and LR schedule; ``ema`` marks the model that is exported."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: LRScheduler | None = None  # built by the trainer from optim.lr_scheduler
    ema: bool = False


class Task(Protocol):
    """Every hook the trainer calls, with its types. Implemented by ``VAETask``, ``LDMTask`` and ``HeadTask``."""

    name: str
    """Run kind for logs, trackers and the checkpoint's trainer state, e.g. ``pretrain-vae``."""
    objectives: list[Objective]
    """Trained models in update order; exactly one has ``ema=True`` (the exported model)."""

    def extra_state(self) -> list[Stateful]:
        """State beyond models/optimizers/schedules that a checkpoint must restore (e.g. a noise generator)."""
        ...

    def enable_gradient_checkpointing(self) -> None:
        """Trade compute for activation memory in the trained networks (``train.gradient_checkpointing``)."""
        ...

    def make_stream(self, accelerator: Accelerator) -> Stream:
        """This rank's training data; called once, after the models are prepared."""
        ...

    def losses(self, accelerator: Accelerator, batch: Batch, step: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``({objective name: loss to backpropagate}, {part name: detached value to log})`` for optimizer step
        ``step`` (1-based); an objective absent from the first dict is not updated at this step."""
        ...

    def preview(self, model: nn.Module, batch: Batch, device: torch.device) -> list[tuple[str, Tensor]]:
        """Named image rows (B, C, *spatial) in [0, 1] for the preview grid, from the EMA copy ``model``."""
        ...

    def export(self, model: nn.Module, run_dir: Path, device: torch.device) -> None:
        """Write the model-only outputs into ``run_dir`` (main process only; ``model`` carries the EMA weights)."""
        ...


def make_optimizer(params: Iterable[Any], lr: float, optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW with the config's betas and weight decay (every task's optimizer)."""
    return torch.optim.AdamW(params, lr=lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)


class GeneratorState:
    """A ``torch.Generator`` whose state travels with checkpoints (the diffusion noise/timestep stream)."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["state"])


_UNWRAPPED: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def unwrap(accelerator: Accelerator, model: nn.Module) -> nn.Module:
    """``accelerator.unwrap_model`` looked up once per prepared model: accelerate re-reads package metadata
    (``is_deepspeed_available``) on every call, ~4 ms on CPU, and the wrapper never changes after ``prepare``."""
    inner = _UNWRAPPED.get(model)
    if inner is None:
        inner = _UNWRAPPED[model] = accelerator.unwrap_model(model)
    return inner


__all__ = ["Batch", "GeneratorState", "Objective", "Stateful", "Stream", "Task", "make_optimizer", "unwrap"]
