"""Anatomy-conditioned latent diffusion UNet (2D or 3D).

Spatial anatomy (brain mask, GM and WM priors — never the lesion) is given at IMAGE resolution, average-pooled to
the latent grid and concatenated to the noisy latent; metadata arrives as a cross-attention context from
``Conditioner``. The network is MONAI's ``DiffusionModelUNet``; this module runs its blocks itself so diffusers'
``enable_gradient_checkpointing()`` can checkpoint each block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from monai.networks.nets import DiffusionModelUNet
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import Tensor


def resize_to_grid(maps: Tensor, spatial_shape: Sequence[int]) -> Tensor:
    """Resize (B, C, *image_shape) maps to ``spatial_shape``: area averaging when shrinking (a mask becomes the
    fraction of brain in each latent voxel), linear interpolation otherwise."""
    spatial_shape = tuple(int(s) for s in spatial_shape)
    if tuple(maps.shape[2:]) == spatial_shape:
        return maps
    if all(src >= dst for src, dst in zip(maps.shape[2:], spatial_shape, strict=True)):
        pool = F.adaptive_avg_pool2d if maps.ndim == 4 else F.adaptive_avg_pool3d
        return pool(maps, spatial_shape)
    mode = "bilinear" if maps.ndim == 4 else "trilinear"
    return F.interpolate(maps, size=spatial_shape, mode=mode, align_corners=False)


class LatentUNet(ModelMixin, ConfigMixin):
    """Predicts noise (``prediction_type="epsilon"``) or velocity (``"v_prediction"``) for a noisy latent.

    ``use_flash_attention`` routes MONAI attention through ``scaled_dot_product_attention``: about 2x faster with half
    the memory, measured on CPU too (docs ENVIRONMENT.md); off by default to match MONAI.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        spatial_dims: int = 2,
        latent_channels: int = 4,
        anatomy_channels: int = 3,
        channels: Sequence[int] = (64, 128, 128),
        attention_levels: Sequence[bool] = (False, True, True),
        num_res_blocks: int | Sequence[int] = 1,
        num_head_channels: int | Sequence[int] = 32,
        cross_attention_dim: int = 64,
        norm_num_groups: int = 32,
        use_flash_attention: bool = False,
        prediction_type: Literal["epsilon", "v_prediction"] = "epsilon",
        transformer_num_layers: int = 1,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
        if anatomy_channels < 0:
            raise ValueError("anatomy_channels must be >= 0")
        self.unet = DiffusionModelUNet(
            spatial_dims=spatial_dims,
            in_channels=latent_channels + anatomy_channels,
            out_channels=latent_channels,
            num_res_blocks=num_res_blocks if isinstance(num_res_blocks, int) else tuple(num_res_blocks),
            channels=tuple(channels),
            attention_levels=tuple(attention_levels),
            norm_num_groups=norm_num_groups,
            num_head_channels=num_head_channels
            if isinstance(num_head_channels, int)
            else tuple(num_head_channels),
            with_conditioning=True,
            transformer_num_layers=transformer_num_layers,
            cross_attention_dim=cross_attention_dim,
            use_flash_attention=use_flash_attention,
        )
        self.gradient_checkpointing = False

    def _block(self, block: torch.nn.Module, **kwargs: Tensor | list[Tensor] | None):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(lambda: block(**kwargs), use_reentrant=False)
        return block(**kwargs)

    def forward(
        self,
        z_t: Tensor,
        timesteps: Tensor | int,
        anatomy: Tensor | None,
        context: Tensor,
        anatomy_drop_mask: Tensor | None = None,
        down_block_additional_residuals: Sequence[Tensor] | None = None,
        mid_block_additional_residual: Tensor | None = None,
    ) -> Tensor:
        """``z_t`` (B, latent_channels, *latent_shape); ``anatomy`` (B, anatomy_channels, *image_shape) or None when
        anatomy_channels == 0; ``context`` (B, T, cross_attention_dim). Rows of ``anatomy_drop_mask`` (B,) that are
        True see all-zero anatomy — the unconditional input used by conditioning dropout and guidance."""
        batch = z_t.shape[0]
        net = self.unet
        if self.config.anatomy_channels:
            if anatomy is None or anatomy.shape[1] != self.config.anatomy_channels:
                got = None if anatomy is None else tuple(anatomy.shape)
                raise ValueError(f"expected anatomy with {self.config.anatomy_channels} channels, got {got}")
            maps = resize_to_grid(anatomy.to(z_t.dtype), z_t.shape[2:])
            if anatomy_drop_mask is not None:
                keep = ~anatomy_drop_mask.to(z_t.device).bool().reshape(-1, *([1] * (maps.ndim - 1)))
                maps = maps * keep.to(maps.dtype)
            x = torch.cat([z_t, maps], dim=1)
        else:
            x = z_t
        timesteps = torch.as_tensor(timesteps, device=z_t.device).reshape(-1)
        if timesteps.numel() == 1:
            timesteps = timesteps.expand(batch)
        # the same steps as DiffusionModelUNet.forward, one block at a time (checkpointable)
        emb = net.time_embed(get_timestep_embedding(timesteps, net.block_out_channels[0]).to(dtype=x.dtype))
        context = context.to(x.dtype)
        h = net.conv_in(x)
        residuals: list[Tensor] = [h]
        for block in net.down_blocks:
            h, block_residuals = self._block(block, hidden_states=h, temb=emb, context=context)
            residuals.extend(block_residuals)
        if down_block_additional_residuals is not None:
            residuals = [
                r + extra for r, extra in zip(residuals, down_block_additional_residuals, strict=True)
            ]
        h = self._block(net.middle_block, hidden_states=h, temb=emb, context=context)
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual
        for block in net.up_blocks:
            split = -len(block.resnets)
            block_residuals, residuals = residuals[split:], residuals[:split]
            h = self._block(
                block, hidden_states=h, res_hidden_states_list=block_residuals, temb=emb, context=context
            )
        return net.out(h)
