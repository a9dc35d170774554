"""Stage 1 task: ``BrainVAE`` on L1 + KL (+ perceptual), with a PatchGAN discriminator after the warm-up."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from brainfm.config import PretrainConfig
from brainfm.io import BrainFMInputError
from brainfm.train.export import copy_data_recipe, save_pretrained
from brainfm.train.stream import BatchStream, make_loader
from brainfm.train.tasks import Batch, Objective, Stateful, make_optimizer, unwrap

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger(__name__)

SCALING_BATCHES = 16  # batches of training data used to estimate the VAE latent scaling factor


class VAETask:
    """Stage 1: ``BrainVAE`` on L1 + KL (+ perceptual), with a PatchGAN discriminator after the warm-up."""

    name = "pretrain-vae"

    def __init__(self, config: PretrainConfig, probe: Batch) -> None:
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
        self.objectives = [Objective("generator", self.model, make_optimizer(self.model.parameters(),
                                                                             config.optim.lr, config.optim),
                                     ema=True)]
        if self.discriminator is not None:
            disc_lr = vae.disc_lr if vae.disc_lr is not None else config.optim.lr
            self.objectives.append(
                Objective("discriminator", self.discriminator, make_optimizer(self.discriminator.parameters(),
                                                                              disc_lr, config.optim))
            )

    def extra_state(self) -> list[Stateful]:
        return []

    def enable_gradient_checkpointing(self) -> None:
        self.model.enable_gradient_checkpointing()

    def make_stream(self, accelerator: Accelerator) -> BatchStream:
        config = self.config
        return BatchStream(make_loader(config, config.data.train_split, rank=accelerator.process_index,
                                       world_size=accelerator.num_processes))

    def losses(self, accelerator: Accelerator, batch: Batch, step: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``step`` is the optimizer step being computed (1-based); the discriminator joins after the warm-up."""
        image = batch["image"].to(accelerator.device)
        generator_model = self.objectives[0].model
        recon, mu, sigma = generator_model(image)
        adversarial = self.discriminator is not None and step > self.config.vae.adv_warmup_steps
        fake_logits = None
        if adversarial:
            disc = unwrap(accelerator, self.objectives[1].model)
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
    def preview(self, model: nn.Module, batch: Batch, device: torch.device) -> list[tuple[str, Tensor]]:
        image = batch["image"][:4].to(device)
        recon, _, _ = model(image)
        return [("input", image), ("reconstruction", recon.clamp(0, 1)), ("|error|", (recon - image).abs())]

    def export(self, model: nn.Module, run_dir: Path, device: torch.device) -> None:
        """``RUN/vae`` with the latent scaling factor measured on the training data, and ``data_recipe.json``."""
        factor = scaling_factor(model, self.config, device)
        model.register_to_config(scaling_factor=factor)
        save_pretrained(model, run_dir / "vae")
        copy_data_recipe(self.config, run_dir)


@torch.no_grad()
def scaling_factor(vae: Any, config: PretrainConfig, device: torch.device) -> float:
    """1/std of training latents (posterior means), so diffusion sees unit-variance latents."""
    loader = make_loader(config, config.data.train_split, rank=0, world_size=1, augment=False, num_workers=0)
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


__all__ = ["SCALING_BATCHES", "VAETask", "scaling_factor"]
