"""One ``accelerate`` training loop for both pretraining stages.

The loop owns everything that is the same for the VAE and the latent-diffusion stage — distributed setup,
gradient accumulation, clipping, the non-finite guard, EMA, LR schedule, checkpoints, logs and exports — and a
small per-stage *task* object owns what differs: which networks train, with which optimizers, on which loss.
Data comes from ``brainfm.data.reader.make_dataloader``, which splits shards by rank itself and can save and
restore its position, so a resumed run continues exactly where it stopped instead of replaying data.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from brainfm.config import ConfigError, PretrainConfig, save_config, to_dict
from brainfm.io import BrainFMInputError, atomic_path, write_json
from brainfm.train.checkpoint import CheckpointManager, latest_checkpoint, resolve_resume
from brainfm.train.guards import NonFiniteGuard

log = logging.getLogger(__name__)

Stage = Literal["vae", "ldm"]
LOSS_LOG = "losses.jsonl"
SCALING_BATCHES = 16  # batches of training data used to estimate the VAE latent scaling factor


# ------------------------------------------------------------------------------------------------ data stream
class BatchStream:
    """Endless batches over epochs of a resumable shard reader; its state is (epoch, reader position)."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.epoch = 0
        self._iterator: Iterator[dict[str, Any]] | None = None
        self._resumed_state: dict[str, Any] | None = None

    def next(self) -> dict[str, Any]:
        empty_epochs = 0
        while True:
            if self._iterator is None:
                self.loader.set_epoch(self.epoch)
                if self._resumed_state is not None:
                    self.loader.load_state_dict(self._resumed_state)
                    self._resumed_state = None
                self._iterator = iter(self.loader)
            try:
                return next(self._iterator)
            except StopIteration:
                self.epoch += 1
                self._iterator = None
                empty_epochs += 1
                if empty_epochs > 1:
                    raise BrainFMInputError(None, "the training split yields no batches on this rank") from None

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "reader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self._resumed_state = state["reader"]
        self._iterator = None


class GeneratorState:
    """A ``torch.Generator`` whose state travels with checkpoints (the diffusion noise/timestep stream)."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["state"])


# ------------------------------------------------------------------------------------------------ tasks
@dataclass
class Objective:
    """One trained model with its optimizer and LR schedule; ``ema`` marks the model that is exported."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    ema: bool = False


def _anatomy(batch: dict[str, Any], device: torch.device) -> Tensor:
    """UNet anatomy conditioning = brain mask + tissue priors, channel-concatenated."""
    return torch.cat([batch["mask"], batch["anatomy"]], dim=1).to(device)


def _optimizer(params: Any, lr: float, config: PretrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=tuple(config.optim.betas), weight_decay=config.optim.weight_decay)


class VAETask:
    """Stage 1: ``BrainVAE`` on L1 + KL (+ perceptual), with a PatchGAN discriminator after the warm-up."""

    stage: Stage = "vae"

    def __init__(self, config: PretrainConfig, probe: dict[str, Any]) -> None:
        from brainfm.models.losses import VAELoss
        from brainfm.models.vae import BrainVAE, make_discriminator

        self.config = config
        vae = config.vae
        dims = config.spatial_dims
        in_channels = int(probe["image"].shape[1])
        self.vae_kwargs = dict(vae.network, spatial_dims=dims, in_channels=in_channels, out_channels=in_channels,
                               scaling_factor=1.0)
        self.model = BrainVAE(**self.vae_kwargs)
        self.loss = VAELoss(vae.kl_weight, vae.adv_weight, vae.perceptual_weight, vae.perceptual_weights_path, dims)
        self.discriminator = (
            make_discriminator(dims, in_channels, **dict(vae.discriminator)) if vae.adv_weight > 0 else None
        )
        self.objectives = [Objective("generator", self.model, _optimizer(self.model.parameters(), config.optim.lr,
                                                                           config), ema=True)]
        if self.discriminator is not None:
            disc_lr = vae.disc_lr if vae.disc_lr is not None else config.optim.lr
            self.objectives.append(
                Objective("discriminator", self.discriminator, _optimizer(self.discriminator.parameters(), disc_lr,
                                                                           config))
            )
        self.loss_module = self.loss

    def extra_state(self) -> list[Any]:
        return []

    def enable_gradient_checkpointing(self) -> None:
        self.model.enable_gradient_checkpointing()

    def losses(self, accelerator: Any, batch: dict[str, Any], step: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``step`` is the optimizer step being computed (1-based); the discriminator joins after the warm-up."""
        image = batch["image"].to(accelerator.device)
        generator_model = self.objectives[0].model
        recon, mu, sigma = generator_model(image)
        adversarial = self.discriminator is not None and step > self.config.vae.adv_warmup_steps
        fake_logits = None
        if adversarial:
            disc = _unwrap(accelerator, self.objectives[1].model)
            disc.requires_grad_(False)  # the generator's loss must not write discriminator gradients
            fake_logits = disc(recon.float())
            disc.requires_grad_(True)
        total, parts = self.loss.generator_loss(image, recon, mu, sigma, fake_logits)
        losses = {"generator": total}
        if adversarial:
            disc_model = self.objectives[1].model
            logits = disc_model(torch.cat([image, recon.detach().float()], dim=0))
            real_logits, fake_logits = logits.chunk(2, dim=0)
            losses["discriminator"] = self.loss.discriminator_loss(real_logits, fake_logits)
        return losses, parts

    @torch.no_grad()
    def preview(self, model: nn.Module, batch: dict[str, Any], device: torch.device) -> list[tuple[str, Tensor]]:
        image = batch["image"][:4].to(device)
        recon, _, _ = model(image)
        return [("input", image), ("reconstruction", recon.clamp(0, 1)), ("|error|", (recon - image).abs())]


class _Denoiser(nn.Module):
    """UNet + metadata encoder as ONE module, so DDP/DeepSpeed wrap a single model and the loss runs inside its
    ``forward`` (calling the submodules directly would bypass DDP's gradient hooks)."""

    def __init__(self, unet: nn.Module, encoder: nn.Module, scheduler: Any, cond_drop_prob: float) -> None:
        super().__init__()
        self.unet = unet
        self.encoder = encoder
        self.noise_scheduler = scheduler
        self.cond_drop_prob = cond_drop_prob

    def forward(self, latents: Tensor, anatomy: Tensor, tokens: dict[str, Tensor],
                generator: torch.Generator | None) -> Tensor:
        from brainfm.diffusion.objective import diffusion_loss

        return diffusion_loss(self.unet, self.encoder, latents, anatomy, tokens, self.noise_scheduler,
                              cond_drop_prob=self.cond_drop_prob, generator=generator)


class LDMTask:
    """Stage 2: frozen VAE latents → anatomy- and metadata-conditioned latent UNet."""

    stage: Stage = "ldm"

    def __init__(self, config: PretrainConfig, probe: dict[str, Any], vae_path: Path, seed: int) -> None:
        from brainfm.diffusion.schedulers import make_scheduler
        from brainfm.models.conditioning import ConditionEncoder
        from brainfm.models.unet import LatentUNet
        from brainfm.models.vae import BrainVAE

        self.config = config
        ldm = config.ldm
        if not (vae_path / "config.json").is_file():
            raise BrainFMInputError(vae_path, "no trained VAE here (run `brainfm pretrain vae` first or set ldm.vae_path)")
        self.vae = BrainVAE.from_pretrained(str(vae_path))
        self.vae.requires_grad_(False).eval()
        if self.vae.config.spatial_dims != config.spatial_dims:
            raise BrainFMInputError(vae_path, f"VAE is {self.vae.config.spatial_dims}D but data.mode is {config.data.mode}")
        anatomy_channels = int(probe["mask"].shape[1] + probe["anatomy"].shape[1])
        self.unet_kwargs = dict(ldm.unet, spatial_dims=config.spatial_dims,
                                latent_channels=self.vae.config.latent_channels, anatomy_channels=anatomy_channels,
                                prediction_type=ldm.prediction_type)
        unet = LatentUNet(**self.unet_kwargs)
        encoder = ConditionEncoder(**dict(ldm.conditioner))
        self.noise_scheduler = make_scheduler(ldm.noise_scheduler, ldm.num_train_timesteps, ldm.beta_schedule,
                                              ldm.prediction_type)
        self.model = _Denoiser(unet, encoder, self.noise_scheduler, ldm.cond_drop_prob)
        self.objectives = [Objective("denoiser", self.model, _optimizer(self.model.parameters(), config.optim.lr,
                                                                         config), ema=True)]
        self.noise = GeneratorState(seed)
        self.cache: LatentCache | None = None

    def extra_state(self) -> list[Any]:
        return [self.noise]

    def enable_gradient_checkpointing(self) -> None:
        self.model.unet.enable_gradient_checkpointing()

    def to(self, device: torch.device) -> None:
        self.vae.to(device)

    @torch.no_grad()
    def encode(self, batch: dict[str, Any], device: torch.device) -> Tensor:
        return self.vae.encode_latent(batch["image"].to(device)).float()

    def losses(self, accelerator: Any, batch: dict[str, Any], step: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        device = accelerator.device
        latents = batch["latents"].to(device) if "latents" in batch else self.encode(batch, device)
        encoder = _unwrap(accelerator, self.objectives[0].model).encoder
        tokens = encoder.tokenize(batch["meta"], batch.get("slice_position"))
        loss = self.objectives[0].model(latents, _anatomy(batch, device), tokens, self.noise.generator)
        return {"denoiser": loss}, {"mse": loss.detach()}

    @torch.no_grad()
    def preview(self, model: nn.Module, batch: dict[str, Any], device: torch.device) -> list[tuple[str, Tensor]]:
        """Samples drawn from pure noise under each scan's own anatomy and metadata (DDIM, few steps)."""
        from brainfm.diffusion.schedulers import make_scheduler

        n = min(4, len(batch["meta"]))
        anatomy = _anatomy(batch, device)[:n]
        tokens = model.encoder.tokenize(batch["meta"][:n], None if batch.get("slice_position") is None
                                        else batch["slice_position"][:n])
        context = model.encoder(tokens)
        sampler = make_scheduler("ddim", self.config.ldm.num_train_timesteps, self.config.ldm.beta_schedule,
                                 self.config.ldm.prediction_type)
        sampler.set_timesteps(self.config.ldm.sample_steps)
        factor = self.vae.downsample_factor
        latent_shape = (n, self.vae.config.latent_channels, *(s // factor for s in anatomy.shape[2:]))
        z = torch.randn(latent_shape, generator=torch.Generator().manual_seed(0)).to(device)
        for t in sampler.timesteps:
            z = sampler.step(model.unet(z, t.to(device), anatomy, context), t, z).prev_sample
        sample = self.vae.decode_latent(z).clamp(0, 1)
        out = [("brain mask", batch["mask"][:n].to(device)), ("prior 1", batch["anatomy"][:n, :1].to(device)),
               ("sample", sample)]
        if "image" in batch:
            out.insert(0, ("real scan", batch["image"][:n].to(device)))
        return out


class LatentCache:
    """The training split encoded once by the frozen VAE and kept in memory (``ldm.cache_latents``).

    Only valid without augmentation. Iteration order is a seeded permutation per epoch, so the state
    (epoch, position) restores the exact stream on resume, like the shard reader.
    """

    def __init__(self, batches: list[dict[str, Any]], batch_size: int, seed: int) -> None:
        keys = ("latents", "mask", "anatomy")
        self.tensors = {k: torch.cat([b[k] for b in batches]) for k in keys}
        self.meta = [m for b in batches for m in b["meta"]]
        positions = [b.get("slice_position") for b in batches]
        self.slice_position = None if any(p is None for p in positions) else torch.cat(positions)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        if not self.meta:
            raise BrainFMInputError(None, "latent cache is empty: the training split yields no samples on this rank")

    def __len__(self) -> int:
        return len(self.meta)

    def next(self) -> dict[str, Any]:
        if self.position >= len(self):
            self.epoch += 1
            self.position = 0
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))
        index = order[self.position:self.position + self.batch_size]
        self.position += len(index)
        batch: dict[str, Any] = {k: v[index] for k, v in self.tensors.items()}
        batch["meta"] = [self.meta[i] for i in index.tolist()]
        if self.slice_position is not None:
            batch["slice_position"] = self.slice_position[index]
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


# ------------------------------------------------------------------------------------------------ helpers
_UNWRAPPED: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def _unwrap(accelerator: Any, model: nn.Module) -> nn.Module:
    """``accelerator.unwrap_model`` looked up once per prepared model: accelerate re-reads package metadata
    (``is_deepspeed_available``) on every call, ~4 ms on CPU, and the wrapper never changes after ``prepare``."""
    inner = _UNWRAPPED.get(model)
    if inner is None:
        inner = _UNWRAPPED[model] = accelerator.unwrap_model(model)
    return inner


def _make_loader(config: PretrainConfig, split: str, *, rank: int, world_size: int, batch_size: int | None = None,
                 augment: bool = True, num_workers: int | None = None) -> Any:
    """The shard reader for this rank; ``augment=False`` forces the stored data (probes, caches, scaling)."""
    from brainfm.data.reader import make_dataloader

    data = config.data
    reader = data.reader_config() if augment else dataclasses.replace(data, augment=False).reader_config()
    return make_dataloader(
        data.shard_dir, split, mode=data.mode, batch_size=batch_size or data.batch_size, seed=config.train.seed,
        num_workers=data.num_workers if num_workers is None else num_workers, rank=rank, world_size=world_size,
        augment=reader,
    )


def _probe_batch(config: PretrainConfig) -> dict[str, Any]:
    """One batch read outside the training stream (which it must not advance) to learn channel counts."""
    loader = _make_loader(config, config.data.train_split, rank=0, world_size=1, batch_size=1, augment=False,
                          num_workers=0)
    loader.set_epoch(0)
    for batch in loader:
        return batch
    raise BrainFMInputError(Path(config.data.shard_dir), f"split {config.data.train_split!r} yields no samples")


def _sample_keys(batch: dict[str, Any]) -> list[str]:
    keys = []
    for i, meta in enumerate(batch.get("meta", [])):
        key = meta.get("__key__") or meta.get("key") or meta.get("subject_id") or meta.get("subject") or str(meta)
        if "slice_position" in batch and batch["slice_position"] is not None:
            key = f"{key}@{float(batch['slice_position'][i]):.4f}"
        keys.append(str(key))
    return keys


def _slices_for_grid(t: Tensor) -> np.ndarray:
    """(B, C, X, Y[, Z]) → (B, H, W) float in [0, 1]: first channel, middle axial slice for 3D, top-up display."""
    t = t.detach().float().cpu()[:, 0]
    if t.ndim == 4:
        t = t[..., t.shape[-1] // 2]
    return np.rot90(t.numpy(), k=1, axes=(1, 2)).clip(0, 1)


def image_grid(rows: list[tuple[str, Tensor]]) -> np.ndarray:
    """Rows of images (one row per named tensor) as an (H, W, 3) uint8 array."""
    panels = [_slices_for_grid(t) for _, t in rows]
    n = min(p.shape[0] for p in panels)
    h, w = panels[0].shape[1:]
    grid = np.zeros((len(panels) * (h + 2), n * (w + 2)), dtype=np.float32)
    for r, panel in enumerate(panels):
        for c in range(n):
            grid[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = panel[c][:h, :w]
    return np.repeat((grid * 255).astype(np.uint8)[..., None], 3, axis=2)


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop records written after the checkpoint we resume from (the killed run's lost steps)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))


def _flat_hparams(config: PretrainConfig) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section, values in to_dict(config).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, int | float | str | bool) else json.dumps(value)
    return flat


def run_dir_for(config: PretrainConfig, stage: Stage, output_dir: str | os.PathLike | None = None) -> Path:
    """A stage's run folder: ``<output_dir>/<stage>``."""
    return Path(output_dir or config.train.output_dir) / stage


def _make_accelerator(config: PretrainConfig, run_dir: Path) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    handlers = []
    if not torch.cuda.is_available() and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        # Launched (torchrun / accelerate launch) on CPU: DeepSpeed through Accelerate needs gloo named explicitly
        # or Accelerate counts one process. A plain single-process run must not get it (it would look distributed).
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    return Accelerator(
        gradient_accumulation_steps=config.optim.grad_accum,
        mixed_precision=config.train.mixed_precision,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        kwargs_handlers=handlers,
    )


def _check_distributed(accelerator: Any, config: PretrainConfig, task: Any) -> None:
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    if len(task.objectives) > 1:
        raise ConfigError("adversarial VAE training needs two optimizers, which one DeepSpeed engine cannot hold; "
                          "set vae.adv_weight: 0 or launch the VAE stage with DDP/FSDP")
    if config.train.nonfinite_policy == "skip":
        raise ConfigError("train.nonfinite_policy 'skip' is not possible under DeepSpeed (the engine steps inside "
                          "backward); use 'abort'")
    plugin = accelerator.state.deepspeed_plugin
    if plugin.zero_stage == 3 and config.train.ema_decay is not None:
        raise ConfigError("EMA over ZeRO-3 partitioned weights is not supported; set train.ema_decay: null or use ZeRO-2")
    ds = plugin.deepspeed_config
    # Our reader is not an accelerate-prepared DataLoader, so DeepSpeed's "auto" batch fields are filled here.
    ds["train_micro_batch_size_per_gpu"] = config.data.batch_size
    ds["train_batch_size"] = config.data.batch_size * config.optim.grad_accum * accelerator.num_processes
    ds["gradient_accumulation_steps"] = config.optim.grad_accum
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = config.optim.grad_clip or 0.0


# ------------------------------------------------------------------------------------------------ main loop
def train(
    stage: Stage,
    config: PretrainConfig,
    *,
    resume: str | None = None,
    output_dir: str | os.PathLike | None = None,
    max_steps: int | None = None,
    task_factory: Any = None,
) -> Path:
    """Train one stage; returns the run folder holding ``checkpoints/``, ``logs/`` and the model exports.

    ``task_factory(accelerator)`` plugs in another task (e.g. the fine-tuning heads of ``brainfm.finetune``) under
    the same loop, checkpoints, guards and resume: it returns an object with the VAETask/LDMTask interface plus
    ``make_stream(accelerator)`` and ``export(model, run_dir)``; ``stage`` then only names the run folder.
    """
    from accelerate.utils import set_seed
    from diffusers.optimization import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    if task_factory is None and stage not in ("vae", "ldm"):
        raise ValueError(f"stage must be 'vae' or 'ldm', got {stage!r}")
    total_steps = max_steps or config.optim.max_steps
    run_dir = run_dir_for(config, stage, output_dir)
    acc = _make_accelerator(config, run_dir)
    rank, world = acc.process_index, acc.num_processes
    seed = config.train.seed

    if task_factory is not None:
        set_seed(seed)  # identical initial weights on every rank
        task: Any = task_factory(acc)
    elif stage == "vae":
        probe = _probe_batch(config)
        set_seed(seed)
        task = VAETask(config, probe)
    else:
        probe = _probe_batch(config)
        set_seed(seed)
        vae_path = Path(config.ldm.vae_path) if config.ldm.vae_path else run_dir_for(config, "vae", output_dir) / "vae"
        task = LDMTask(config, probe, vae_path, seed * 1000 + rank)
        task.to(acc.device)
    _check_distributed(acc, config, task)
    if config.train.gradient_checkpointing:
        task.enable_gradient_checkpointing()

    for objective in task.objectives:
        make = get_cosine_schedule_with_warmup if config.optim.lr_scheduler == "cosine" else None
        if make is not None:
            objective.scheduler = make(objective.optimizer, config.optim.warmup_steps, total_steps)
        else:
            objective.scheduler = get_constant_schedule_with_warmup(objective.optimizer, config.optim.warmup_steps)
    prepared = acc.prepare(*[x for o in task.objectives for x in (o.model, o.optimizer)])
    for i, objective in enumerate(task.objectives):
        objective.model, objective.optimizer = prepared[2 * i], prepared[2 * i + 1]
    set_seed(seed, device_specific=True)  # per-rank noise from here on

    ema = None
    ema_objective = next(o for o in task.objectives if o.ema)
    if config.train.ema_decay is not None:
        # foreach: one fused update per step instead of a Python loop (with package checks) per parameter.
        ema = EMAModel(_unwrap(acc, ema_objective.model).parameters(), decay=config.train.ema_decay,
                       use_ema_warmup=False, foreach=True)
        ema.to(acc.device)
    guard = NonFiniteGuard(config.train.nonfinite_policy, config.train.max_nonfinite_skips)
    acc.register_for_checkpointing(*[o.scheduler for o in task.objectives], guard, *task.extra_state())
    if ema is not None:
        acc.register_for_checkpointing(ema)

    if hasattr(task, "make_stream"):
        stream = task.make_stream(acc)
    elif stage == "ldm" and getattr(config.ldm, "cache_latents", False):
        if config.data.augment:
            raise ConfigError("ldm.cache_latents needs data.augment: false (cached latents would freeze one augmentation)")
        stream: Any = _build_latent_cache(task, config, acc)
    else:
        stream = BatchStream(_make_loader(config, config.data.train_split, rank=rank, world_size=world))

    checkpoints = CheckpointManager(acc, run_dir, config.train.keep_checkpoints)
    logs_dir = run_dir / "logs"
    loss_log = logs_dir / LOSS_LOG
    keys_log = logs_dir / f"samples-rank{rank}.jsonl"
    step = 0
    resume_from = resolve_resume(resume, run_dir)
    if resume_from is None and latest_checkpoint(run_dir) is not None and resume != "auto":
        raise BrainFMInputError(run_dir, "run folder already holds checkpoints; pass --resume auto to continue it or "
                                         "choose another --output-dir")
    if resume_from is not None:
        trainer_state, data_state = checkpoints.load(resume_from)
        step = int(trainer_state["step"])
        if data_state is not None:
            stream.load_state_dict(data_state)
        if acc.is_main_process:
            _truncate_jsonl(loss_log, step)
        _truncate_jsonl(keys_log, step)
        log.info("resumed from %s at step %d", resume_from, step)
    elif acc.is_main_process and loss_log.exists():
        loss_log.unlink()
    if resume_from is None and keys_log.exists():
        keys_log.unlink()
    acc.wait_for_everyone()
    logs_dir.mkdir(parents=True, exist_ok=True)
    if acc.is_main_process:
        save_config(config, run_dir / "config.yaml")
        acc.init_trackers(f"pretrain-{stage}", config=_flat_hparams(config))

    from accelerate.utils import DistributedType

    deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
    clip = config.optim.grad_clip if config.optim.grad_clip is not None else math.inf
    progress = tqdm(total=total_steps, initial=step, disable=not acc.is_main_process, desc=f"pretrain {stage}")
    last_saved = step if resume_from is not None else -1
    for model in (o.model for o in task.objectives):
        model.train()
    # Parameter lists built once: walking the module tree every step costs more than the clipping itself.
    clip_params = [list(o.model.parameters()) for o in task.objectives]
    ema_params = list(_unwrap(acc, ema_objective.model).parameters())
    preview_batch: dict[str, Any] | None = None
    with open(keys_log, "a") as keys_handle, (open(loss_log, "a") if acc.is_main_process else open(os.devnull, "w")) \
            as loss_handle:
        while step < total_steps:
            current = step + 1
            window: dict[str, list[float]] = {}
            bad: dict[str, str] = {}
            parts_sum: dict[str, float] = {}
            window_keys: list[str] = []
            for _ in range(config.optim.grad_accum):
                batch = stream.next()
                preview_batch = batch if preview_batch is None else preview_batch
                window_keys.extend(_sample_keys(batch))
                with acc.accumulate(*[o.model for o in task.objectives]):
                    losses, parts = task.losses(acc, batch, current)
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
                        norm = None
                        if objective.name not in bad:
                            norm = acc.clip_grad_norm_(params, clip)
                            if (not deepspeed and config.train.mixed_precision != "fp16" and norm is not None
                                    and not math.isfinite(float(norm))):
                                bad[objective.name] = f"gradient norm {float(norm)}"
                        ok = guard.allow_update(current, f"{objective.name} {bad.get(objective.name, '')}".strip(),
                                                objective.name not in bad, bad.get(objective.name, ""))
                        if ok:
                            objective.optimizer.step()
                            if ema is not None and objective.ema:
                                ema.step(ema_params)
                        objective.optimizer.zero_grad(set_to_none=True)
                        objective.scheduler.step()
            step = current
            progress.update(1)
            keys_handle.write(json.dumps({"step": step, "keys": window_keys}) + "\n")
            keys_handle.flush()
            record = {
                "step": step,
                "lr": task.objectives[0].scheduler.get_last_lr()[0],
                "losses": {k: float(np.mean(v)) for k, v in window.items()},
                "parts": parts_sum,
                "skipped_updates": guard.skipped,
                "time": time.time(),  # wall clock: throughput monitoring (excluded from reproducibility checks)
            }
            loss_handle.write(json.dumps(record) + "\n")
            loss_handle.flush()
            if step % config.train.log_every == 0 or step == total_steps:
                scalars = {f"loss/{k}": v for k, v in record["losses"].items() if math.isfinite(v)}
                scalars.update({f"parts/{k}": v for k, v in parts_sum.items() if math.isfinite(v)})
                scalars.update({"lr": record["lr"], "nonfinite/skipped": guard.skipped})
                acc.log(scalars, step=step)
                progress.set_postfix({k: f"{v[-1]:.4g}" for k, v in window.items()})
            if config.train.sample_every and step % config.train.sample_every == 0 and acc.is_main_process:
                _write_preview(acc, task, ema, ema_objective, preview_batch, run_dir, step)
            if step % config.train.checkpoint_every == 0 or step == total_steps:
                checkpoints.save(step, {"stage": stage, "nonfinite_skipped": guard.skipped}, stream.state_dict())
                last_saved = step
    progress.close()
    if last_saved != step:
        checkpoints.save(step, {"stage": stage, "nonfinite_skipped": guard.skipped}, stream.state_dict())
    _export(acc, task, ema, ema_objective, config, run_dir)
    acc.end_training()
    return run_dir


def _build_latent_cache(task: LDMTask, config: PretrainConfig, acc: Any) -> LatentCache:
    """Encode this rank's share of one training epoch (no augmentation) with the frozen VAE."""
    loader = _make_loader(config, config.data.train_split, rank=acc.process_index, world_size=acc.num_processes,
                          augment=False)
    loader.set_epoch(0)
    batches = []
    for batch in loader:
        cached = {"latents": task.encode(batch, acc.device).cpu(), "mask": batch["mask"], "anatomy": batch["anatomy"],
                  "meta": batch["meta"], "slice_position": batch.get("slice_position")}
        batches.append(cached)
    log.info("cached latents of %d batches on rank %d", len(batches), acc.process_index)
    return LatentCache(batches, config.data.batch_size, config.train.seed * 1000 + acc.process_index)


def _ema_weights(acc: Any, ema: Any, objective: Objective) -> nn.Module:
    """A plain copy of the exported model carrying the EMA weights (or the live weights without EMA)."""
    import copy

    model = copy.deepcopy(_unwrap(acc, objective.model)).cpu().eval()
    if ema is not None:
        ema.copy_to(model.parameters())
    return model


@torch.no_grad()
def _write_preview(acc: Any, task: Any, ema: Any, objective: Objective, batch: dict[str, Any] | None,
                   run_dir: Path, step: int) -> None:
    """PNG grid (and TensorBoard image) of reconstructions or samples with their conditioning, from EMA weights."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if batch is None:
        return
    model = _ema_weights(acc, ema, objective).to(acc.device)
    rows = task.preview(model, batch, acc.device)
    grid = image_grid(rows)
    path = run_dir / "samples" / f"step-{step:07d}.png"
    with atomic_path(path) as tmp:
        plt.imsave(tmp, grid, format="png")
    (run_dir / "samples" / f"step-{step:07d}.json").write_text(
        json.dumps({"rows": [name for name, _ in rows], "keys": _sample_keys(batch)[:grid.shape[1]]}))
    tracker = acc.get_tracker("tensorboard", unwrap=True)
    tracker.add_image("preview", grid, step, dataformats="HWC")


def _copy_data_recipe(config: PretrainConfig, run_dir: Path) -> None:
    """The preprocessing recipe the model was trained on, copied from the shard index: inference must repeat it."""
    from brainfm.data.writer import load_index

    index = load_index(config.data.shard_dir)
    write_json(run_dir / "data_recipe.json", {
        "recipe": index.get("recipe"), "grid_shape": index.get("grid_shape"),
        "anatomy_channels": index.get("anatomy_channels"), "shards_config": index.get("shards_config"),
        "counts": index.get("counts"), "mode": config.data.mode,
    })


def _export(acc: Any, task: Any, ema: Any, objective: Objective, config: PretrainConfig, run_dir: Path) -> None:
    """Model-only save_pretrained folders (safetensors), from EMA weights when enabled."""
    acc.wait_for_everyone()
    if acc.is_main_process:
        model = _ema_weights(acc, ema, objective)
        if hasattr(task, "export"):  # a plugged-in task writes its own exports
            task.export(model, run_dir)
            save_config(config, run_dir / "config.yaml")
            acc.wait_for_everyone()
            return
        if task.stage == "vae":
            factor = _scaling_factor(model, config, acc.device)
            model.register_to_config(scaling_factor=factor)
            _save_pretrained(model, run_dir / "vae")
        else:
            _save_pretrained(model.unet, run_dir / "unet")
            _save_pretrained(model.encoder, run_dir / "conditioner")
            with atomic_path(run_dir / "scheduler") as tmp:
                task.noise_scheduler.save_pretrained(str(tmp))
        save_config(config, run_dir / "config.yaml")
        _copy_data_recipe(config, run_dir)
    acc.wait_for_everyone()


def _save_pretrained(model: nn.Module, destination: Path) -> None:
    with atomic_path(destination) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)


@torch.no_grad()
def _scaling_factor(vae: nn.Module, config: PretrainConfig, device: torch.device) -> float:
    """1/std of training latents (posterior means), so diffusion sees unit-variance latents."""
    loader = _make_loader(config, config.data.train_split, rank=0, world_size=1, augment=False, num_workers=0)
    loader.set_epoch(0)
    vae = vae.to(device)
    latents = []
    for i, batch in enumerate(loader):
        if i >= SCALING_BATCHES:
            break
        mu, _ = vae.encode(batch["image"].to(device))
        latents.append(mu.float().cpu())
    if not latents:
        raise BrainFMInputError(Path(config.data.shard_dir), "no training batches to compute the latent scaling factor")
    factor = vae.set_scaling_factor(torch.cat(latents))
    vae.cpu()
    log.info("latent scaling factor %.5f from %d batches", factor, len(latents))
    return factor


__all__ = ["BatchStream", "LatentCache", "LDMTask", "VAETask", "image_grid", "run_dir_for", "train"]

