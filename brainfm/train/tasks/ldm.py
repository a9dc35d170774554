"""Stage 2 task: frozen VAE latents → anatomy- and metadata-conditioned latent UNet."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from brainfm.config import ConfigError, PretrainConfig
from brainfm.io import BrainFMInputError
from brainfm.train.export import copy_data_recipe, export_model_folder
from brainfm.train.stream import BatchStream, make_loader
from brainfm.train.tasks import Batch, GeneratorState, Objective, Stateful, make_optimizer, unwrap

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger(__name__)


def _anatomy(batch: Batch, device: torch.device) -> Tensor:
    """UNet anatomy conditioning = brain mask + tissue priors, channel-concatenated."""
    return torch.cat([batch["mask"], batch["anatomy"]], dim=1).to(device)


class Denoiser(nn.Module):
    """UNet + conditioner as ONE module, so DDP/DeepSpeed wrap a single model and the loss runs inside its
    ``forward`` (calling the submodules directly would bypass DDP's gradient hooks)."""

    def __init__(self, unet: nn.Module, conditioner: nn.Module, noise_scheduler: Any, cond_drop_prob: float) -> None:
        super().__init__()
        self.unet = unet
        self.conditioner = conditioner
        self.noise_scheduler = noise_scheduler
        self.cond_drop_prob = cond_drop_prob

    def forward(self, latents: Tensor, anatomy: Tensor, tokens: dict[str, Tensor],
                generator: torch.Generator | None) -> Tensor:
        from brainfm.diffusion.objective import diffusion_loss

        return diffusion_loss(self.unet, self.conditioner, latents, anatomy, tokens, self.noise_scheduler,
                              cond_drop_prob=self.cond_drop_prob, generator=generator)


class LDMTask:
    """Stage 2: frozen VAE latents → anatomy- and metadata-conditioned latent UNet."""

    name = "pretrain-ldm"

    def __init__(self, config: PretrainConfig, probe: Batch, vae_path: Path, seed: int) -> None:
        from brainfm.diffusion.schedulers import make_scheduler
        from brainfm.models.conditioning import Conditioner
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
        conditioner = Conditioner(**dict(ldm.conditioner))
        self.noise_scheduler = make_scheduler(ldm.noise_scheduler, ldm.num_train_timesteps, ldm.beta_schedule,
                                              ldm.prediction_type)
        self.model = Denoiser(unet, conditioner, self.noise_scheduler, ldm.cond_drop_prob)
        self.objectives = [Objective("denoiser", self.model, make_optimizer(self.model.parameters(),
                                                                            config.optim.lr, config.optim),
                                     ema=True)]
        self.noise = GeneratorState(seed)
        # posterior samples get their own stream, so "mean" runs draw exactly the diffusion noise they always did
        self.posterior_noise = GeneratorState(seed + 7919) if ldm.posterior == "sample" else None
        if ldm.latent_dir:
            self._check_latent_set(Path(ldm.latent_dir), vae_path)

    def extra_state(self) -> list[Stateful]:
        return [self.noise] if self.posterior_noise is None else [self.noise, self.posterior_noise]

    def _check_latent_set(self, latent_dir: Path, vae_path: Path) -> None:
        """Latent shards must come from THIS VAE, hold the training split and match the data mode."""
        from brainfm.data.latents import latent_info, vae_fingerprint
        from brainfm.data.writer import load_index

        config = self.config
        index = load_index(latent_dir)
        info = latent_info(index, latent_dir)
        if info["vae_sha256"] != vae_fingerprint(vae_path):
            raise BrainFMInputError(latent_dir, f"latents of another VAE than {vae_path}: rewrite them with "
                                                "`brainfm data latents`")
        if info["mode"] != config.data.mode or config.data.train_split not in index["splits"]:
            raise BrainFMInputError(latent_dir, f"holds {info['mode']} latents of {sorted(index['splits'])}; "
                                                f"training needs {config.data.mode} {config.data.train_split!r}")
        if config.data.augment:
            raise ConfigError("ldm.latent_dir needs data.augment: false (stored latents cannot follow an "
                              "augmentation of the image)")

    def enable_gradient_checkpointing(self) -> None:
        self.model.unet.enable_gradient_checkpointing()

    def to(self, device: torch.device) -> None:
        """Moves the frozen VAE (the trained denoiser is placed by ``accelerator.prepare``)."""
        self.vae.to(device)

    def make_stream(self, accelerator: Accelerator) -> BatchStream | LatentCache:
        """The shard stream (image shards, or ``ldm.latent_dir``'s latent shards through the same resumable
        reader), or with ``ldm.cache_latents`` this rank's share encoded once into memory."""
        config = self.config
        if config.ldm.latent_dir:
            from brainfm.data.reader import make_dataloader

            data = config.data
            return BatchStream(make_dataloader(
                config.ldm.latent_dir, data.train_split, mode=data.mode, batch_size=data.batch_size,
                seed=config.train.seed, num_workers=data.num_workers, rank=accelerator.process_index,
                world_size=accelerator.num_processes, augment=data.reader_config()))
        if config.ldm.cache_latents:
            if config.data.augment:
                raise ConfigError("ldm.cache_latents needs data.augment: false (cached latents would freeze one "
                                  "augmentation)")
            return self._latent_cache(accelerator)
        return BatchStream(make_loader(config, config.data.train_split, rank=accelerator.process_index,
                                       world_size=accelerator.num_processes))

    @torch.no_grad()
    def posterior(self, batch: Batch, device: torch.device) -> tuple[Tensor, Tensor]:
        """Unscaled posterior (mean, std): read from latent shards or a latent cache, else encoded."""
        if "latent_mean" in batch:
            return batch["latent_mean"].to(device), batch["latent_std"].to(device)
        mu, sigma = self.vae.encode(batch["image"].to(device))
        return mu.float(), sigma.float()

    @torch.no_grad()
    def latents(self, batch: Batch, device: torch.device) -> Tensor:
        """The diffusion-space latent of ``ldm.posterior``: the mean, or a fresh sample, times the scaling factor."""
        mu, sigma = self.posterior(batch, device)
        if self.posterior_noise is not None:
            eps = torch.randn(mu.shape, generator=self.posterior_noise.generator, dtype=mu.dtype).to(device)
            mu = mu + sigma * eps
        return mu * self.vae.config.scaling_factor

    def losses(self, accelerator: Accelerator, batch: Batch, step: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        device = accelerator.device
        latents = self.latents(batch, device)
        conditioner = unwrap(accelerator, self.objectives[0].model).conditioner
        tokens = conditioner.tokenize(batch["meta"], batch.get("slice_position"))
        loss = self.objectives[0].model(latents, _anatomy(batch, device), tokens, self.noise.generator)
        return {"denoiser": loss}, {"mse": loss.detach()}

    @torch.no_grad()
    def preview(self, model: nn.Module, batch: Batch, device: torch.device) -> list[tuple[str, Tensor]]:
        """Samples drawn from pure noise under each scan's own anatomy and metadata (DDIM, few steps)."""
        from brainfm.diffusion.schedulers import make_scheduler

        n = min(4, len(batch["meta"]))
        anatomy = _anatomy(batch, device)[:n]
        tokens = model.conditioner.tokenize(batch["meta"][:n], None if batch.get("slice_position") is None
                                            else batch["slice_position"][:n])
        context = model.conditioner(tokens)
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

    def export(self, model: nn.Module, run_dir: Path, device: torch.device) -> None:
        """``RUN/model``, the complete uncalibrated model folder (frozen VAE, EMA denoiser, noise schedule) that
        ``brainfm calibrate --run`` starts from, and ``data_recipe.json``."""
        export_model_folder(self.vae, model.unet, model.conditioner, self.noise_scheduler, self.config, run_dir)
        copy_data_recipe(self.config, run_dir)

    def _latent_cache(self, accelerator: Accelerator) -> LatentCache:
        """Encode this rank's share of one training epoch (no augmentation) with the frozen VAE."""
        config = self.config
        loader = make_loader(config, config.data.train_split, rank=accelerator.process_index,
                             world_size=accelerator.num_processes, augment=False)
        loader.set_epoch(0)
        batches = []
        for batch in loader:
            mu, sigma = self.posterior(batch, accelerator.device)
            batches.append({"latent_mean": mu.cpu(), "latent_std": sigma.cpu(), "mask": batch["mask"],
                            "anatomy": batch["anatomy"], "meta": batch["meta"],
                            "slice_position": batch.get("slice_position")})
        log.info("cached latents of %d batches on rank %d", len(batches), accelerator.process_index)
        return LatentCache(batches, config.data.batch_size, config.train.seed * 1000 + accelerator.process_index)


class LatentCache:
    """The training split encoded once by the frozen VAE and kept in memory: the posterior mean and std
    (``ldm.cache_latents``) or scaled latents (``brainfm adapt``); every tensor of the batches is kept.

    Only valid without augmentation. Iteration order is a seeded permutation per epoch, so the state
    (epoch, position) restores the exact stream on resume, like the shard reader.
    """

    def __init__(self, batches: list[Batch], batch_size: int, seed: int) -> None:
        keys = [k for k, v in (batches[0] if batches else {}).items()
                if isinstance(v, Tensor) and k != "slice_position"]
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

    def next(self) -> Batch:
        if self.position >= len(self):
            self.epoch += 1
            self.position = 0
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))
        index = order[self.position:self.position + self.batch_size]
        self.position += len(index)
        batch: Batch = {k: v[index] for k, v in self.tensors.items()}
        batch["meta"] = [self.meta[i] for i in index.tolist()]
        if self.slice_position is not None:
            batch["slice_position"] = self.slice_position[index]
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


__all__ = ["LDMTask", "LatentCache"]
