"""VAE objective: L1 reconstruction + KL + optional perceptual + least-squares PatchGAN adversarial terms.

The perceptual term never downloads anything: MONAI's ``PerceptualLoss`` needs ``lpips``/``torchvision`` or a
``torch.hub`` download, so here it is an LPIPS-style distance on the multi-scale features of MONAI's torchvision-free
``ResNetFeatures`` (2D or 3D; MedicalNet-compatible layout) loaded from a local weights file.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from monai.networks.nets.resnet import ResNetFeatures
from safetensors.torch import load_file
from torch import Tensor, nn

from brainfm.io import BrainFMInputError


def kl_divergence(mu: Tensor, sigma: Tensor) -> Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) summed over latent voxels and channels, averaged over the batch."""
    sigma_sq = sigma.float().pow(2)
    per_voxel = mu.float().pow(2) + sigma_sq - torch.log(sigma_sq.clamp_min(1e-12)) - 1.0
    return 0.5 * per_voxel.flatten(1).sum(dim=1).mean()


def _load_state_dict(path: Path) -> dict[str, Tensor]:
    """Read a weights file: safetensors preferred; .pt/.pth (MedicalNet ships those) only with weights_only=True."""
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
    except Exception as error:  # corrupt/truncated/pickled-object files all end here
        raise BrainFMInputError(
            path, f"cannot read perceptual weights ({type(error).__name__}: {error})"
        ) from error
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise BrainFMInputError(path, "perceptual weights file does not hold a tensor state dict")
    return {key.removeprefix("module."): value for key, value in state.items()}


class ResNetPerceptualLoss(nn.Module):
    """LPIPS-style distance: unit-normalise each feature map over channels, mean squared difference, sum over scales.

    Both images are standardised with the TARGET's mean/std (MedicalNet was trained on z-scored volumes) so an
    intensity error in the reconstruction still counts. The network is frozen and kept in eval mode.
    """

    def __init__(
        self, weights_path: str | os.PathLike, spatial_dims: int = 2, model_name: str = "resnet10"
    ) -> None:
        super().__init__()
        path = Path(weights_path)
        self.network = ResNetFeatures(model_name, pretrained=False, spatial_dims=spatial_dims, in_channels=1)
        state = {key: value for key, value in _load_state_dict(path).items() if not key.startswith("fc.")}
        try:
            self.network.load_state_dict(state, strict=True)
        except RuntimeError as error:
            first_line = str(error).strip().splitlines()[0]
            raise BrainFMInputError(
                path, f"weights do not fit a {spatial_dims}D {model_name}: {first_line}"
            ) from error
        self.network.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> ResNetPerceptualLoss:
        super().train(mode)
        self.network.eval()  # frozen batch-norm statistics whatever the caller's mode
        return self

    def forward(self, reconstruction: Tensor, target: Tensor) -> Tensor:
        dims = tuple(range(1, target.ndim))
        mean = target.mean(dim=dims, keepdim=True)
        std = target.std(dim=dims, keepdim=True).clamp_min(1e-6)
        total = reconstruction.new_zeros(())
        # one channel at a time: the network takes single-channel images
        for channel in range(target.shape[1]):
            recon_c = ((reconstruction[:, channel : channel + 1] - mean) / std).float()
            target_c = ((target[:, channel : channel + 1] - mean) / std).float()
            for feat_r, feat_t in zip(self.network(recon_c), self.network(target_c), strict=True):
                diff = F.normalize(feat_r, dim=1, eps=1e-10) - F.normalize(feat_t, dim=1, eps=1e-10)
                total = total + diff.pow(2).sum(dim=1).mean()
        return total / target.shape[1]


class VAELoss(nn.Module):
    """Generator and discriminator objectives for training ``BrainVAE`` with a PatchGAN.

    ``generator_loss`` returns the weighted total and the UNWEIGHTED parts (detached) for logging. The perceptual
    term exists only when ``perceptual_weights_path`` names an existing file; otherwise its weight is 0 and one
    warning says so — it never downloads.
    """

    def __init__(
        self,
        kl_weight: float = 1e-6,
        adv_weight: float = 0.01,
        perceptual_weight: float = 0.0,
        perceptual_weights_path: str | os.PathLike | None = None,
        spatial_dims: int = 2,
        perceptual_model: str = "resnet10",
    ) -> None:
        super().__init__()
        self.kl_weight = float(kl_weight)
        self.adv_weight = float(adv_weight)
        self.adversarial = PatchAdversarialLoss(criterion="least_squares", reduction="mean")
        self.perceptual: ResNetPerceptualLoss | None = None
        self.perceptual_weight = 0.0
        if perceptual_weight > 0:
            if perceptual_weights_path is not None and Path(perceptual_weights_path).is_file():
                self.perceptual = ResNetPerceptualLoss(
                    perceptual_weights_path, spatial_dims, perceptual_model
                )
                self.perceptual_weight = float(perceptual_weight)
            else:
                warnings.warn(
                    f"perceptual_weight={perceptual_weight} ignored: no perceptual weights file at "
                    f"{perceptual_weights_path!r} (brainfm never downloads); training without a perceptual term",
                    stacklevel=2,
                )

    def generator_loss(
        self, x: Tensor, recon: Tensor, mu: Tensor, sigma: Tensor, disc_fake_logits: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        recon_loss = F.l1_loss(recon.float(), x.float())
        kl = kl_divergence(mu, sigma)
        total = recon_loss + self.kl_weight * kl
        parts = {"recon": recon_loss.detach(), "kl": kl.detach()}
        if self.perceptual is not None:
            perceptual = self.perceptual(recon, x)
            total = total + self.perceptual_weight * perceptual
            parts["perceptual"] = perceptual.detach()
        if disc_fake_logits is not None:
            adversarial = self.adversarial(disc_fake_logits, target_is_real=True, for_discriminator=False)
            total = total + self.adv_weight * adversarial
            parts["adversarial"] = adversarial.detach()
        parts["total"] = total.detach()
        return total, parts

    def discriminator_loss(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        """Least-squares GAN loss; pass logits of DETACHED reconstructions as ``fake_logits``."""
        fake = self.adversarial(fake_logits, target_is_real=False, for_discriminator=True)
        real = self.adversarial(real_logits, target_is_real=True, for_discriminator=True)
        return 0.5 * (fake + real)
