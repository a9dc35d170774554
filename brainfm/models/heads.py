"""Fine-tuning heads on top of the frozen foundation model, and LoRA adapters for its latent UNet.

A head sees what the unsupervised pipeline already knows about a scan — the scan itself, its pseudo-healthy
reconstruction and the calibrated deviation (z) map, optionally intermediate features of the frozen latent UNet —
and turns it into a lesion probability map. Because the evidence is already there, a few labelled scans suffice
where a network trained from scratch needs many. Disease-specific behaviour comes either from one output channel
per disease (channel 0 is always "any lesion") or from a disease token that modulates the features (FiLM), whose
extra "any" token serves diseases never seen in training.

The networks are MONAI's (``UNet`` backbone) wrapped in diffusers ``ModelMixin`` + ``ConfigMixin`` so a head saves
and loads as ``config.json`` + safetensors like every other brainfm component. LoRA goes through ``peft``: only the
adapters train and save, and they ship beside the head in a model folder.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from monai.networks.nets import UNet
from torch import Tensor, nn

from brainfm.io import BrainFMInputError
from brainfm.models.unet import LatentUNet

HEAD_INPUTS: tuple[str, ...] = ("scan", "pseudo_healthy", "zmap")
DiseaseMode = Literal["none", "outputs", "film"]
ANY_LESION = "any"
DEFAULT_LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "out_proj", "conv1.conv", "conv2.conv")


class LesionHead(ModelMixin, ConfigMixin):
    """Small MONAI UNet: [scan, pseudo-healthy, z-map, (UNet features)] → lesion logits.

    Output channels: ``disease_mode="outputs"`` → 1 + len(diseases) (channel 0 = any lesion, then one per
    disease); ``"none"`` and ``"film"`` → 1. ``inputs`` may be any subset of ``HEAD_INPUTS`` in that order: the
    scan-only head is the trained-from-scratch baseline.
    """

    @register_to_config
    def __init__(
        self,
        spatial_dims: int = 2,
        inputs: Sequence[str] = HEAD_INPUTS,
        feature_channels: int = 0,
        channels: Sequence[int] = (8, 16, 32),
        num_res_units: int = 1,
        diseases: Sequence[str] = (),
        disease_mode: DiseaseMode = "outputs",
        z_clip: float = 10.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        inputs = tuple(inputs)
        if not inputs or any(name not in HEAD_INPUTS for name in inputs) or len(set(inputs)) != len(inputs):
            raise ValueError(f"inputs must be distinct names among {HEAD_INPUTS}, got {inputs}")
        if [n for n in HEAD_INPUTS if n in inputs] != list(inputs):
            raise ValueError(f"inputs must keep the order of {HEAD_INPUTS}, got {inputs}")
        if disease_mode not in ("none", "outputs", "film"):
            raise ValueError(f"disease_mode must be none, outputs or film, got {disease_mode!r}")
        if len(channels) < 2 or feature_channels < 0 or z_clip <= 0:
            raise ValueError("channels needs >= 2 levels, feature_channels >= 0 and z_clip > 0")
        if ANY_LESION in diseases or len(set(diseases)) != len(tuple(diseases)):
            raise ValueError(f"diseases must be distinct and may not include {ANY_LESION!r}, got {diseases}")
        width = int(channels[0])
        self.backbone = UNet(
            spatial_dims=spatial_dims,
            in_channels=len(inputs) + feature_channels,
            out_channels=width,
            channels=tuple(int(c) for c in channels),
            strides=(2,) * (len(channels) - 1),
            num_res_units=num_res_units,
            norm="instance",
            dropout=dropout,
        )
        self.film = None
        if disease_mode == "film":
            self.film = nn.Embedding(len(diseases) + 1, 2 * width)  # last row: the "any lesion" token
            nn.init.zeros_(self.film.weight)  # starts as identity: gamma = 1, beta = 0
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.activation = nn.PReLU()
        self.output = conv(width, self.num_outputs, kernel_size=1)

    # -- bookkeeping --------------------------------------------------------------------------------------------
    @property
    def num_outputs(self) -> int:
        return 1 + len(self.config.diseases) if self.config.disease_mode == "outputs" else 1

    @property
    def multiple(self) -> int:
        """Spatial sizes are padded to a multiple of this (the backbone halves them len(channels) - 1 times)."""
        return 2 ** (len(self.config.channels) - 1)

    def disease_index(self, names: Sequence[str | None]) -> Tensor:
        """Token index per sample; a disease the head was not trained on (or None) maps to the "any" token."""
        known = {name: i for i, name in enumerate(self.config.diseases)}
        return torch.tensor([known.get(n, len(known)) if n else len(known) for n in names], dtype=torch.long)

    def output_channel(self, disease: str | None) -> int:
        """The logit channel to read for ``disease``: its own channel when trained on it, else "any lesion"."""
        if self.config.disease_mode == "outputs" and disease in self.config.diseases:
            return 1 + list(self.config.diseases).index(disease)
        return 0

    # -- forward ------------------------------------------------------------------------------------------------
    def assemble(
        self, scan: Tensor, pseudo_healthy: Tensor | None, zmap: Tensor | None, features: Tensor | None = None
    ) -> Tensor:
        """Stack the inputs this head uses, each (B, 1, *spatial); z is clipped and scaled to [-1, 1] so a
        single extreme voxel cannot dominate the normalisation layers."""
        parts = {"scan": scan, "pseudo_healthy": pseudo_healthy, "zmap": zmap}
        stacked = []
        for name in self.config.inputs:
            value = parts[name]
            if value is None:
                raise ValueError(f"this head needs the {name!r} input")
            if name == "zmap":
                value = value.clamp(-self.config.z_clip, self.config.z_clip) / self.config.z_clip
            stacked.append(value)
        if self.config.feature_channels:
            if features is None or features.shape[1] != self.config.feature_channels:
                got = None if features is None else features.shape[1]
                raise ValueError(
                    f"this head needs {self.config.feature_channels} UNet feature channels, got {got}"
                )
            stacked.append(features.to(scan.dtype))
        return torch.cat(stacked, dim=1)

    def forward(self, x: Tensor, disease: Tensor | None = None) -> Tensor:
        """Logits (B, num_outputs, *spatial) for assembled inputs ``x``; ``disease`` (B,) token indices (FiLM
        mode only; None = the "any lesion" token)."""
        spatial = x.shape[2:]
        pad: list[int] = []
        for size in reversed(spatial):
            extra = (-int(size)) % self.multiple
            pad += [0, extra]
        if any(pad):
            x = F.pad(x, pad, mode="replicate")
        h = self.backbone(x)
        if self.film is not None:
            if disease is None:
                disease = torch.full((x.shape[0],), len(self.config.diseases), dtype=torch.long)
            gamma, beta = self.film(disease.to(h.device)).chunk(2, dim=1)
            view = (x.shape[0], -1) + (1,) * (h.ndim - 2)
            h = h * (1 + gamma.reshape(view)) + beta.reshape(view)
        logits = self.output(self.activation(h))
        return logits[(slice(None), slice(None), *(slice(0, int(s)) for s in spatial))]


class UNetFeatures(nn.Module):
    """Intermediate features of the frozen latent UNet for a CLEAN scan latent at a small timestep.

    The output of the last up-block (width = the UNet's first channel count) is upsampled to the image grid. The
    VAE and the conditioner never train here; the UNet trains only through LoRA adapters when they exist.
    """

    def __init__(self, vae: nn.Module, unet: LatentUNet, conditioner: nn.Module, timestep: int) -> None:
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.conditioner = conditioner.eval().requires_grad_(False)
        self.unet = unet.eval()
        self.timestep = int(timestep)
        self._captured: Tensor | None = None
        self.unet.unet.up_blocks[-1].register_forward_hook(self._capture)

    @property
    def channels(self) -> int:
        return int(self.unet.config.channels[0])

    def _capture(self, module: nn.Module, args: Any, output: Tensor) -> None:
        self._captured = output

    def train(self, mode: bool = True) -> UNetFeatures:
        super().train(mode)
        self.vae.eval()
        self.conditioner.eval()
        return self

    def forward(
        self,
        image: Tensor,
        anatomy: Tensor | None,
        meta: Sequence[Mapping[str, Any]],
        slice_position: Tensor | None = None,
    ) -> Tensor:
        with torch.no_grad():
            latent = self.vae.encode_latent(image).float()
            tokens = self.conditioner.tokenize(list(meta), slice_position)
            context = self.conditioner(tokens)
        self.unet(latent, torch.full((image.shape[0],), self.timestep, device=image.device), anatomy, context)
        features, self._captured = self._captured, None
        mode = "bilinear" if image.ndim == 4 else "trilinear"
        return F.interpolate(features.float(), size=image.shape[2:], mode=mode, align_corners=False)


# ---------------------------------------------------------------------------------------------------- LoRA
def add_lora(
    unet: LatentUNet,
    rank: int = 4,
    alpha: float = 8.0,
    dropout: float = 0.0,
    target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
) -> Any:
    """Wrap ``unet`` with trainable LoRA adapters (``peft``) on its attention projections and resnet convs; the
    base weights are frozen. The returned ``PeftModel`` shares the UNet object, whose layers now carry adapters."""
    from peft import LoraConfig, get_peft_model

    if rank < 1 or alpha <= 0:
        raise ValueError(f"LoRA rank must be >= 1 and alpha > 0, got {rank}, {alpha}")
    config = LoraConfig(
        r=int(rank),
        lora_alpha=float(alpha),
        lora_dropout=float(dropout),
        target_modules=list(target_modules),
        init_lora_weights=True,
    )
    return get_peft_model(unet, config)


def save_lora(peft_model: Any, directory: str | os.PathLike) -> Path:
    """Adapters only (``adapter_model.safetensors`` + ``adapter_config.json``), never the frozen base."""
    directory = Path(directory)
    peft_model.save_pretrained(str(directory), safe_serialization=True)
    return directory


def load_lora(unet: LatentUNet, directory: str | os.PathLike, trainable: bool = False) -> Any:
    """Attach saved adapters to a (fresh) base UNet."""
    from peft import PeftModel

    directory = Path(directory)
    if (
        not (directory / "adapter_config.json").is_file()
        or not (directory / "adapter_model.safetensors").is_file()
    ):
        raise BrainFMInputError(
            directory, "no LoRA adapter here (adapter_config.json + adapter_model.safetensors)"
        )
    return PeftModel.from_pretrained(unet, str(directory), is_trainable=trainable)


__all__ = [
    "ANY_LESION",
    "DEFAULT_LORA_TARGETS",
    "HEAD_INPUTS",
    "LesionHead",
    "UNetFeatures",
    "add_lora",
    "load_lora",
    "save_lora",
]
