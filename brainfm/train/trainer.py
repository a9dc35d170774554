"""The one training loop: a :class:`Trainer` runs any :class:`~brainfm.train.tasks.Task` on ``accelerate``.

The trainer owns everything that is the same for the VAE, the latent-diffusion stage and the fine-tuning heads:
distributed set-up, gradient accumulation, clipping, the non-finite guard, EMA, LR schedules, checkpoints and
resume, logs, previews, and calling the task's export with the EMA weights. Usage::

    trainer = Trainer(config, run_dir)          # accelerator; seeds every RNG with train.seed
    task = VAETask(config, probe)               # built right after, so every rank starts from the same weights
    trainer.fit(task, resume="auto")            # -> run_dir with checkpoints/, logs/ and the task's exports

A run folder holds ``checkpoints/step-N`` (see ``brainfm.train.checkpoint``), ``logs/losses.jsonl`` (one record
per optimizer step), ``logs/samples-rank<k>.jsonl`` (the sample keys each rank trained on), ``logs/train.log``,
TensorBoard events, ``samples/`` previews, ``compute.json`` (hardware, wall time, steps/s and samples/s: see
``brainfm.train.compute``), ``config.yaml`` and the exports.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from brainfm.config import AdaptConfig, ConfigError, FinetuneConfig, PretrainConfig, save_config
from brainfm.io import BrainFMInputError
from brainfm.train.checkpoint import CheckpointManager, latest_checkpoint, resolve_resume
from brainfm.train.compute import ComputeRecorder
from brainfm.train.guards import NonFiniteGuard
from brainfm.train.logs import flat_hparams, run_logging, truncate_jsonl
from brainfm.train.previews import save_preview
from brainfm.train.tasks import Batch, Objective, Stream, Task, unwrap

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

log = logging.getLogger(__name__)

LOSS_LOG = "losses.jsonl"
TrainerConfig = PretrainConfig | FinetuneConfig | AdaptConfig  # each has optim, train and data.batch_size


class LostPeerError(RuntimeError):
    """A collective (all-reduce, barrier, broadcast) failed in a multi-process run: another process or node died,
    or stalled for longer than ``train.collective_timeout_s``. The message is one line that says what to do."""


def _collective_failure(exc: BaseException) -> bool:
    """True when ``exc`` comes from the communication layer (a collective of torch.distributed or DeepSpeed, or
    DDP's gradient all-reduce inside backward), not from model code that merely runs under a wrapper."""
    if isinstance(exc, torch.distributed.DistError):
        return True
    tb, innermost = exc.__traceback__, ""
    while tb is not None:
        innermost, tb = tb.tb_frame.f_code.co_filename, tb.tb_next
    path = innermost.replace(os.sep, "/")
    if path.endswith("torch/distributed/distributed_c10d.py") or "/deepspeed/comm/" in path:
        return True
    text = str(exc)  # DDP's reducer raises from C++ with the backend's own message
    return any(mark in text for mark in ("/gloo/", "ProcessGroupGloo", "ProcessGroupNCCL", "NCCL error", "c10d"))


def _first_sentence(exc: BaseException) -> str:
    """gloo's "[/path/pair.cc:537] Read error [addr]: Connection reset by peer. This is typically ..." ->
    "Read error [addr]: Connection reset by peer"."""
    text = " ".join(str(exc).split())
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". ", 1)[0].rstrip(".")[:300] or type(exc).__name__


def die_with_launcher() -> None:
    """Under a launcher (``accelerate launch``/``torchrun``: TORCHELASTIC_RUN_ID), make the kernel kill this worker
    when its launcher dies. torch's elastic agent starts every worker in a session of its own, so a launcher
    killed with SIGKILL (a lost node, ``kill -9`` of its process group) would otherwise leave orphaned workers
    training on — rank 0 among them still writing checkpoints. Linux only; elsewhere nothing changes."""
    import ctypes
    import signal
    import sys

    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) != 0:
        log.warning("could not ask to die with the launcher (prctl errno %d)", ctypes.get_errno())
        return
    if os.getppid() == 1:  # the launcher died before the request: we are an orphan already
        os.kill(os.getpid(), signal.SIGKILL)


def make_accelerator(config: TrainerConfig, run_dir: Path) -> Accelerator:
    """An ``Accelerator`` for this process (DDP, FSDP or DeepSpeed as ``accelerate launch`` configured it)."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    die_with_launcher()
    timeout = timedelta(seconds=config.train.collective_timeout_s)
    handlers = [InitProcessGroupKwargs(timeout=timeout)]
    if not torch.cuda.is_available() and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        # Launched (torchrun / accelerate launch) on CPU: DeepSpeed through Accelerate needs gloo named explicitly
        # or Accelerate counts one process. A plain single-process run must not get it (it would look distributed).
        handlers = [InitProcessGroupKwargs(backend="gloo", timeout=timeout)]
    return Accelerator(
        gradient_accumulation_steps=config.optim.grad_accum,
        mixed_precision=config.train.mixed_precision,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        kwargs_handlers=handlers,
    )


def check_mixed_precision(precision: str) -> None:
    """Refuse fp16 where no GPU will run it: on the CPU accelerate silently trains in fp32 (it only scales fp16 on
    accelerators) and DeepSpeed stops later with "Type fp16 is not supported on your device"; bf16 works on CPU."""
    if precision != "fp16":
        return
    on_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    accelerator = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    if on_cpu or not (accelerator or torch.backends.mps.is_available()):
        raise ConfigError("train.mixed_precision: fp16 needs a GPU and this run is on the CPU; use bf16 or no")


def end_distributed() -> None:
    """Destroy the process group that the trainers of this process shared, if one was started; called by the
    command that owns the process (``brainfm pretrain|finetune``) when it is done with training."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def sample_keys(batch: Batch) -> list[str]:
    """One key per sample of ``batch`` (``key@slice position`` for 2D slices): what a rank trained on."""
    keys = []
    for i, meta in enumerate(batch.get("meta", [])):
        key = meta.get("__key__") or meta.get("key") or meta.get("subject_id") or meta.get("subject") or str(meta)
        if "slice_position" in batch and batch["slice_position"] is not None:
            key = f"{key}@{float(batch['slice_position'][i]):.4f}"
        keys.append(str(key))
    return keys


class Trainer:
    """Runs a :class:`Task` in ``run_dir``: set-up, the optimisation step, checkpoints, logs, previews, export.

    Constructing it creates the accelerator and seeds every RNG with ``train.seed``: build the task right after,
    so that every rank starts from identical weights; it trains for ``optim.max_steps`` steps. Several trainers
    may run one after another in a process; under a launcher the process owner calls :func:`end_distributed` last.
    """

    def __init__(self, config: TrainerConfig, run_dir: str | os.PathLike) -> None:
        from accelerate.utils import set_seed

        self.config = config
        self.run_dir = Path(run_dir)
        self.total_steps = config.optim.max_steps
        check_mixed_precision(config.train.mixed_precision)
        self.accelerator = make_accelerator(config, self.run_dir)
        self.logs_dir = self.run_dir / "logs"
        self._loss_log = self.logs_dir / LOSS_LOG  # written by the main process
        self._keys_log = self.logs_dir / f"samples-rank{self.accelerator.process_index}.jsonl"
        self.guard = NonFiniteGuard(config.train.nonfinite_policy, config.train.max_nonfinite_skips)
        self.ema: EMAModel | None = None
        self.step = 0  # the optimizer step being run (for error messages)
        self.compute: ComputeRecorder | None = None
        self._created = time.monotonic()  # this session's wall time starts here
        set_seed(config.train.seed)  # identical initial weights on every rank

    # ------------------------------------------------------------------------------------------- set-up
    def _check_distributed(self, task: Task) -> None:
        """What DeepSpeed cannot do, refused up front; its "auto" batch fields filled from the config."""
        from accelerate.utils import DistributedType

        acc, config = self.accelerator, self.config
        if acc.distributed_type != DistributedType.DEEPSPEED:
            return
        if len(task.objectives) > 1:
            raise ConfigError("adversarial VAE training needs two optimizers, which one DeepSpeed engine cannot "
                              "hold; set vae.adv_weight: 0 or launch the VAE stage with DDP/FSDP")
        if config.train.nonfinite_policy == "skip":
            raise ConfigError("train.nonfinite_policy 'skip' is not possible under DeepSpeed (the engine steps "
                              "inside backward); use 'abort'")
        plugin = acc.state.deepspeed_plugin
        if plugin.zero_stage == 3 and config.train.ema_decay is not None:
            raise ConfigError("EMA over ZeRO-3 partitioned weights is not supported; set train.ema_decay: null or "
                              "use ZeRO-2")
        ds = plugin.deepspeed_config
        # Our reader is not an accelerate-prepared DataLoader, so DeepSpeed's "auto" batch fields are filled here.
        ds["train_micro_batch_size_per_gpu"] = config.data.batch_size
        ds["train_batch_size"] = config.data.batch_size * config.optim.grad_accum * acc.num_processes
        ds["gradient_accumulation_steps"] = config.optim.grad_accum
        if ds.get("gradient_clipping", "auto") == "auto":
            ds["gradient_clipping"] = config.optim.grad_clip or 0.0

    def _prepare(self, task: Task) -> Objective:
        """LR schedules, ``accelerator.prepare``, EMA and checkpoint registration; returns the EMA objective."""
        from accelerate.utils import set_seed
        from diffusers.optimization import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup
        from diffusers.training_utils import EMAModel

        acc, config = self.accelerator, self.config
        self._check_distributed(task)
        if config.train.gradient_checkpointing:
            task.enable_gradient_checkpointing()
        for objective in task.objectives:
            if config.optim.lr_scheduler == "cosine":
                objective.lr_scheduler = get_cosine_schedule_with_warmup(
                    objective.optimizer, config.optim.warmup_steps, self.total_steps)
            else:
                objective.lr_scheduler = get_constant_schedule_with_warmup(objective.optimizer,
                                                                           config.optim.warmup_steps)
        prepared = acc.prepare(*[x for o in task.objectives for x in (o.model, o.optimizer)])
        for i, objective in enumerate(task.objectives):
            objective.model, objective.optimizer = prepared[2 * i], prepared[2 * i + 1]
        set_seed(config.train.seed, device_specific=True)  # per-rank noise from here on

        ema_objective = next(o for o in task.objectives if o.ema)
        if config.train.ema_decay is not None:
            # foreach: one fused update per step instead of a Python loop (with package checks) per parameter.
            self.ema = EMAModel(unwrap(acc, ema_objective.model).parameters(), decay=config.train.ema_decay,
                                use_ema_warmup=False, foreach=True)
            # fp32 whatever the weights are: DeepSpeed casts the module to bf16, where an update of (1 - decay) x
            # a small difference is below half a unit of the last place and the average would never move
            self.ema.to(acc.device, dtype=torch.float32)
        acc.register_for_checkpointing(*[o.lr_scheduler for o in task.objectives], self.guard, *task.extra_state())
        if self.ema is not None:
            acc.register_for_checkpointing(self.ema)
        return ema_objective

    def _resume_from(self, resume: str | None) -> Path | None:
        """The checkpoint to resume from; a fresh start over an existing run's checkpoints is refused."""
        resume_from = resolve_resume(resume, self.run_dir)
        if resume_from is None and latest_checkpoint(self.run_dir) is not None and resume != "auto":
            raise BrainFMInputError(self.run_dir, "run folder already holds checkpoints; pass --resume auto to "
                                                  "continue it or choose another --output-dir")
        return resume_from

    def _resume(self, resume_from: Path | None, stream: Stream, checkpoints: CheckpointManager) -> tuple[int, bool]:
        """Restore ``resume_from`` (if any) and trim the logs to it, or clear them. Returns (step, resumed)."""
        acc = self.accelerator
        loss_log, keys_log = self._loss_log, self._keys_log
        step = 0
        if resume_from is not None:
            trainer_state, data_state = checkpoints.load(resume_from)
            step = int(trainer_state["step"])
            if data_state is not None:
                stream.load_state_dict(data_state)
            if acc.is_main_process:
                truncate_jsonl(loss_log, step)
            truncate_jsonl(keys_log, step)
            log.info("resumed from %s at step %d", resume_from, step)
        elif acc.is_main_process and loss_log.exists():
            loss_log.unlink()
        if resume_from is None and keys_log.exists():
            keys_log.unlink()
        return step, resume_from is not None

    # ------------------------------------------------------------------------------------------- run
    def fit(self, task: Task, *, resume: str | None = None) -> Path:
        """Train ``task`` to ``max_steps``, checkpointing as configured; export it; return the run folder.

        ``resume``: ``None`` = fresh run (refused if the folder already holds checkpoints), ``"auto"`` = continue
        from the newest complete checkpoint if there is one, or a checkpoint folder.
        """
        acc = self.accelerator
        resume_from = self._resume_from(resume)  # before any set-up work: a refused start costs nothing
        try:
            return self._fit(task, resume_from)
        except (RuntimeError, torch.distributed.DistError) as exc:
            if acc.num_processes == 1 or not _collective_failure(exc):
                raise
            latest = latest_checkpoint(self.run_dir)
            raise LostPeerError(
                f"lost contact with the other processes of this run (rank {acc.process_index} of "
                f"{acc.num_processes}, at step {self.step}): {_first_sentence(exc)}. A process or node died, or "
                f"stalled for more than train.collective_timeout_s={self.config.train.collective_timeout_s:g} s; "
                f"relaunch every node with --resume auto to continue from "
                f"{latest.name if latest is not None else 'the start (no complete checkpoint yet)'}"
            ) from exc

    def _fit(self, task: Task, resume_from: Path | None) -> Path:
        acc = self.accelerator
        with run_logging(self.logs_dir, acc.process_index):
            ema_objective = self._prepare(task)
            stream = task.make_stream(acc)
            checkpoints = CheckpointManager(acc, self.run_dir, self.config.train.keep_checkpoints)
            step, resumed = self._resume(resume_from, stream, checkpoints)
            acc.wait_for_everyone()
            global_batch = self.config.data.batch_size * self.config.optim.grad_accum * acc.num_processes
            self.compute = ComputeRecorder(self.run_dir, task.name, global_batch, created=self._created)
            self.compute.start(acc, step, resumed)
            self.logs_dir.mkdir(parents=True, exist_ok=True)
            if acc.is_main_process:
                save_config(self.config, self.run_dir / "config.yaml")
                acc.init_trackers(task.name, config=flat_hparams(self.config))
            step, last_saved = self._loop(task, stream, checkpoints, ema_objective, step, resumed)
            if last_saved != step:
                checkpoints.save(step, self._trainer_state(task), stream.state_dict())
            if acc.is_main_process:
                self.compute.write(step)  # before the export, which may carry it into the model folder
            self._export(task, ema_objective)
            for tracker in acc.trackers:  # not acc.end_training(): it also ends the process group, which the
                tracker.finish()          # next trainer of this process (one per fine-tuned head) still needs
        return self.run_dir

    def _trainer_state(self, task: Task) -> dict[str, Any]:
        return {"task": task.name, "nonfinite_skipped": self.guard.skipped}

    def _loop(self, task: Task, stream: Stream, checkpoints: CheckpointManager, ema_objective: Objective,
              step: int, resumed: bool) -> tuple[int, int]:
        """Optimizer steps ``step + 1 .. total_steps``; returns (last step, step of the last checkpoint written)."""
        from tqdm.auto import tqdm

        acc, config = self.accelerator, self.config
        progress = tqdm(total=self.total_steps, initial=step, disable=not acc.is_main_process,
                        desc=task.name.replace("-", " "))
        last_saved = step if resumed else -1
        for model in (o.model for o in task.objectives):
            model.train()
        # Parameter lists built once: walking the module tree every step costs more than the clipping itself.
        clip_params = [list(o.model.parameters()) for o in task.objectives]
        ema_params = list(unwrap(acc, ema_objective.model).parameters())
        preview_batch: Batch | None = None
        loss_target = self._loss_log if acc.is_main_process else Path(os.devnull)
        with (open(self._keys_log, "a", encoding="utf-8") as keys_handle,
              open(loss_target, "a", encoding="utf-8") as loss_handle):
            try:
                while step < self.total_steps:
                    step += 1
                    self.step = step
                    window, parts, keys, batch = self._step(task, stream, step, clip_params, ema_params)
                    preview_batch = batch if preview_batch is None else preview_batch
                    progress.update(1)
                    self._record(keys_handle, loss_handle, progress, task, step, window, parts, keys)
                    if config.train.sample_every and step % config.train.sample_every == 0 and acc.is_main_process:
                        self._preview(task, ema_objective, preview_batch, step)
                    if step % config.train.checkpoint_every == 0 or step == self.total_steps:
                        checkpoints.save(step, self._trainer_state(task), stream.state_dict())
                        last_saved = step
                        if acc.is_main_process:
                            self.compute.write(step)
            finally:
                progress.close()  # ends the bar's line, so an error message starts on a line of its own
        return step, last_saved

    def _step(self, task: Task, stream: Stream, step: int, clip_params: list[list[nn.Parameter]],
              ema_params: list[nn.Parameter]) -> tuple[dict[str, list[float]], dict[str, float], list[str], Batch]:
        """One optimizer step over ``optim.grad_accum`` micro-batches: rank-mean losses, backward, clipping, the
        non-finite guard, update, EMA, LR schedule. Returns (losses per micro-batch, mean parts, sample keys,
        the first micro-batch)."""
        from accelerate.utils import DistributedType

        acc, config, guard, world = self.accelerator, self.config, self.guard, self.accelerator.num_processes
        deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        clip = config.optim.grad_clip if config.optim.grad_clip is not None else math.inf
        window: dict[str, list[float]] = {}
        bad: dict[str, str] = {}
        parts_sum: dict[str, float] = {}
        window_keys: list[str] = []
        first: Batch | None = None
        for _ in range(config.optim.grad_accum):
            batch = stream.next()
            first = batch if first is None else first
            window_keys.extend(sample_keys(batch))
            with acc.accumulate(*[o.model for o in task.objectives]):
                with self._autocast():
                    losses, parts = task.losses(acc, batch, step)
                names = list(losses)
                # One all-reduce gives both the rank-mean loss and a rank-consistent finiteness decision:
                # the sum is non-finite iff some rank's loss is.
                summed = acc.reduce(torch.stack([losses[n].detach().float() for n in names]), "sum")
                for i, name in enumerate(names):
                    value = float(summed[i]) / world
                    window.setdefault(name, []).append(value)
                    if not math.isfinite(value):
                        bad[name] = f"loss {value}"
                        continue  # no backward on any rank: nothing non-finite reaches the gradients
                    acc.backward(losses[name])
                for key, value in parts.items():
                    parts_sum[key] = parts_sum.get(key, 0.0) + float(value) / config.optim.grad_accum
                if not acc.sync_gradients:
                    continue
                for objective, params in zip(task.objectives, clip_params, strict=True):
                    if objective.name not in names:
                        continue
                    if objective.name not in bad:
                        norm = acc.clip_grad_norm_(params, clip)
                        if (not deepspeed and config.train.mixed_precision != "fp16" and norm is not None
                                and not math.isfinite(float(norm))):
                            bad[objective.name] = f"gradient norm {float(norm)}"
                    ok = guard.allow_update(step, f"{objective.name} {bad.get(objective.name, '')}".strip(),
                                            objective.name not in bad, bad.get(objective.name, ""))
                    if ok:
                        objective.optimizer.step()
                        if self.ema is not None and objective.ema:
                            self.ema.step(ema_params)
                    objective.optimizer.zero_grad(set_to_none=True)
                    objective.lr_scheduler.step()
        assert first is not None  # grad_accum >= 1 (validated by the config)
        return window, parts_sum, window_keys, first

    def _autocast(self) -> Any:
        """Under DeepSpeed with bf16/fp16 the engine casts the module's weights but not the batch, and accelerate
        adds no autocast there: torch's autocast casts each op's inputs instead. Elsewhere accelerate's own
        autocast (on the prepared model's forward) is in place already."""
        import contextlib

        from accelerate.utils import DistributedType

        acc, precision = self.accelerator, self.config.train.mixed_precision
        if acc.distributed_type != DistributedType.DEEPSPEED or precision == "no":
            return contextlib.nullcontext()
        return torch.autocast(acc.device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)

    def _record(self, keys_handle: IO[str], loss_handle: IO[str], progress: Any, task: Task, step: int,
                window: dict[str, list[float]], parts: dict[str, float], keys: list[str]) -> None:
        """Sample keys (every rank), the loss record (main process), tracker scalars and the progress bar."""
        keys_handle.write(json.dumps({"step": step, "keys": keys}) + "\n")
        keys_handle.flush()
        record = {
            "step": step,
            "lr": task.objectives[0].lr_scheduler.get_last_lr()[0],
            "losses": {k: float(np.mean(v)) for k, v in window.items()},
            "parts": parts,
            "skipped_updates": self.guard.skipped,
            "time": time.time(),  # wall clock: throughput monitoring (excluded from reproducibility checks)
        }
        loss_handle.write(json.dumps(record) + "\n")
        loss_handle.flush()
        if step % self.config.train.log_every == 0 or step == self.total_steps:
            scalars = {f"loss/{k}": v for k, v in record["losses"].items() if math.isfinite(v)}
            scalars.update({f"parts/{k}": v for k, v in parts.items() if math.isfinite(v)})
            scalars.update({"lr": record["lr"], "nonfinite/skipped": self.guard.skipped})
            self.accelerator.log(scalars, step=step)
            progress.set_postfix({k: f"{v[-1]:.4g}" for k, v in window.items()})

    # ------------------------------------------------------------------------------------------- outputs
    def _ema_weights(self, objective: Objective) -> nn.Module:
        """A plain copy of the exported model carrying the EMA weights (or the live weights without EMA)."""
        model = copy.deepcopy(unwrap(self.accelerator, objective.model)).cpu().float().eval()
        if self.ema is not None:
            self.ema.copy_to(model.parameters())
        return model

    @torch.no_grad()
    def _preview(self, task: Task, objective: Objective, batch: Batch, step: int) -> None:
        """PNG grid (and TensorBoard image) of the task's preview rows, from the EMA weights."""
        acc = self.accelerator
        model = self._ema_weights(objective).to(acc.device)
        rows = task.preview(model, batch, acc.device)
        grid = save_preview(self.run_dir / "samples", step, rows, sample_keys(batch))
        tracker = acc.get_tracker("tensorboard", unwrap=True)
        tracker.add_image("preview", grid, step, dataformats="HWC")

    def _export(self, task: Task, objective: Objective) -> None:
        """The task's model-only outputs from the EMA weights, and ``config.yaml``, written by the main process."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            task.export(self._ema_weights(objective), self.run_dir, acc.device)
            save_config(self.config, self.run_dir / "config.yaml")
        acc.wait_for_everyone()


__all__ = ["LOSS_LOG", "LostPeerError", "Trainer", "TrainerConfig", "end_distributed", "make_accelerator", "sample_keys"]
