"""Tiled VAE encode/decode in bounded memory, equal to the whole-volume forward up to float rounding.

MONAI's ``AutoencoderKL`` normalises with GroupNorm over the whole volume, so encoding independent tiles (diffusers'
tiled VAE, MONAI sliding-window decoding) changes every normalisation inside a tile and leaves seams where tiles
meet. Here the network runs layer by layer over the whole volume, but each layer in slabs along the longest
spatial axis: a convolution reads its slab plus a halo of ``kernel // 2`` voxels (zero padding only at the true
volume border); a GroupNorm first accumulates its group statistics over every slab (float64) and is then applied
slab by slab, fused into the input of the convolution that follows it, as are SiLU and the decoder's nearest
upsampling. Nothing is approximated, so tiles cannot show.

Peak memory is about three activation maps of one layer (its input, the middle map of a residual block and its
output) plus one slab's temporaries, instead of the many whole-volume maps of a plain forward (each GroupNorm,
SiLU and upsampling output, the convolution workspace). Attention blocks, where present, run on their whole map:
they sit at the coarsest levels where the map is small. Inference only (no autograd graph is kept).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, SpatialAttentionBlock, UpSample
from monai.networks.nets.autoencoderkl import AEKLDownsample, AEKLResBlock, AutoencoderKL
from torch import Tensor, nn

DEFAULT_SLAB_ELEMENTS = 1 << 24  # float elements of one slab's input (64 MB in float32)

SlabFn = Callable[[Tensor], Tensor]


def _conv_module(block: nn.Module) -> nn.Conv2d | nn.Conv3d:
    """The bare convolution of a MONAI ``Convolution(conv_only=True)``."""
    children = dict(block.named_children())
    conv = children.get("conv")
    if set(children) != {"conv"} or not isinstance(conv, nn.Conv2d | nn.Conv3d):
        raise ValueError(f"tiled VAE: unsupported convolution block {block}")
    if conv.padding_mode != "zeros" or any(d != 1 for d in conv.dilation) or isinstance(conv.padding, str):
        raise ValueError(f"tiled VAE: unsupported convolution settings in {conv}")
    return conv


class _Slabs:
    """Runs one layer at a time over the whole map, slab by slab along ``axis``."""

    def __init__(self, axis: int, slab_elements: int) -> None:
        self.axis = axis
        self.slab_elements = max(1, int(slab_elements))

    def _rows(self, shape: Sequence[int], channels: int, per_row: int = 1) -> int:
        across = math.prod(shape[2:]) // shape[self.axis]
        return max(1, self.slab_elements // max(1, shape[0] * channels * across * per_row))

    # ------------------------------------------------------------------------------------------ GroupNorm
    def group_norm(self, x: Tensor, norm: nn.GroupNorm, silu: bool) -> SlabFn:
        """GroupNorm (then SiLU) with the statistics of the WHOLE map, as a function applied to any slab: per-slab
        mean and variance (float32, as torch computes them) merged across slabs in float64 (Chan et al.)."""
        batch, channels, groups = x.shape[0], x.shape[1], norm.num_groups
        count = torch.zeros((), dtype=torch.float64)
        mean = torch.zeros(batch, groups, dtype=torch.float64)
        m2 = torch.zeros(batch, groups, dtype=torch.float64)
        length, rows = x.shape[self.axis], self._rows(x.shape, channels)
        for start in range(0, length, rows):
            part = x.narrow(self.axis, start, min(rows, length - start)).reshape(batch, groups, -1)
            var_b, mean_b = torch.var_mean(part, dim=-1, correction=0)
            n_b = float(part.shape[-1])
            delta = mean_b.double() - mean
            total = count + n_b
            mean = mean + delta * (n_b / total)
            m2 = m2 + var_b.double() * n_b + delta.square() * (count * n_b / total)
            count = total
        inv_std = torch.rsqrt(m2 / count + norm.eps)
        # per channel: y = x * scale + shift, so applying it is one fused pass over a slab
        per_channel = channels // groups
        scale = inv_std.repeat_interleave(per_channel, dim=1)
        shift = -mean.repeat_interleave(per_channel, dim=1) * scale
        if norm.weight is not None:
            scale, shift = scale * norm.weight.double(), shift * norm.weight.double() + norm.bias.double()
        view = (batch, channels) + (1,) * (x.ndim - 2)
        scale, shift = scale.to(x.dtype).reshape(view), shift.to(x.dtype).reshape(view)

        def apply(slab: Tensor) -> Tensor:
            out = torch.addcmul(shift, slab, scale)
            return F.silu(out, inplace=True) if silu else out

        return apply

    # ------------------------------------------------------------------------------------------ convolution
    def conv(self, conv: nn.Conv2d | nn.Conv3d, x: Tensor, pre: SlabFn | None = None, upsample: int = 1,
             extra_pad: int = 0, add_to: Tensor | None = None) -> Tensor:
        """``conv(pad(upsample(pre(x))))`` slab by slab: ``upsample`` is nearest-neighbour by an integer factor,
        ``extra_pad`` zeros appended at the end of every axis (MONAI's asymmetric downsampling pad). With ``add_to``
        given, the result is added to it in place (a residual connection) and it is returned."""
        axis, dims = self.axis, x.ndim - 2
        kernel, stride, padding = conv.kernel_size, conv.stride, conv.padding
        size_in = [s * upsample for s in x.shape[2:]]
        pads = [(p, p + extra_pad) for p in padding]
        size_out = [(n + a + b - k) // s + 1 for n, (a, b), k, s in zip(size_in, pads, kernel, stride, strict=True)]
        out = x.new_empty((x.shape[0], conv.out_channels, *size_out)) if add_to is None else add_to
        a = axis - 2
        channels = max(conv.in_channels, conv.out_channels)
        rows = self._rows((x.shape[0], channels, *size_in), channels, stride[a])
        convolve = F.conv3d if dims == 3 else F.conv2d
        for start in range(0, size_out[a], rows):
            stop = min(size_out[a], start + rows)
            low = start * stride[a] - pads[a][0]
            high = (stop - 1) * stride[a] - pads[a][0] + kernel[a]
            clip_low, clip_high = max(low, 0), min(high, size_in[a])
            first, last = clip_low // upsample, -(-clip_high // upsample)
            slab = x.narrow(axis, first, last - first)
            if pre is not None:
                slab = pre(slab)
            if upsample > 1:
                slab = F.interpolate(slab, scale_factor=upsample, mode="nearest")
                slab = slab.narrow(axis, clip_low - first * upsample, clip_high - clip_low)
            # zeros along the split axis only at the volume border; symmetric padding of the other axes is left
            # to the convolution (no copy); MONAI's asymmetric downsampling pad needs an explicit one
            widths: list[int] = []
            for d in reversed(range(dims)):  # F.pad lists the last axis first
                widths += [clip_low - low, high - clip_high] if d == a else [0, pads[d][1] - pads[d][0]]
            if any(widths):
                slab = F.pad(slab, widths)
            conv_padding = tuple(0 if d == a else pads[d][0] for d in range(dims))
            result = convolve(slab, conv.weight, conv.bias, stride, conv_padding, 1, conv.groups)
            target = out.narrow(axis, start, stop - start)
            if target.shape != result.shape:
                raise RuntimeError(f"tiled VAE: slab shape {tuple(result.shape)} != {tuple(target.shape)}")
            if add_to is None:
                target.copy_(result)
            else:
                target.add_(result)
        return out

    # ------------------------------------------------------------------------------------------ blocks
    def res_block(self, block: AEKLResBlock, x: Tensor) -> Tensor:
        hidden = self.conv(_conv_module(block.conv1), x, pre=self.group_norm(x, block.norm1, silu=True))
        out = self.conv(_conv_module(block.conv2), hidden, pre=self.group_norm(hidden, block.norm2, silu=True))
        del hidden
        if isinstance(block.nin_shortcut, nn.Identity):
            return out.add_(x)
        return self.conv(_conv_module(block.nin_shortcut), x, add_to=out)

    def blocks(self, blocks: Sequence[nn.Module], x: Tensor) -> Tensor:
        """An ``Encoder``/``Decoder`` block list; a GroupNorm followed by a convolution is fused into it."""
        i = 0
        while i < len(blocks):
            block = blocks[i]
            if isinstance(block, nn.GroupNorm) and i + 1 < len(blocks) and isinstance(blocks[i + 1], Convolution):
                x = self.conv(_conv_module(blocks[i + 1]), x, pre=self.group_norm(x, block, silu=False))
                i += 2
                continue
            if isinstance(block, Convolution):
                x = self.conv(_conv_module(block), x)
            elif isinstance(block, AEKLResBlock):
                x = self.res_block(block, x)
            elif isinstance(block, AEKLDownsample):
                x = self.conv(_conv_module(block.conv), x, extra_pad=1)
            elif isinstance(block, UpSample):
                x = self.conv(_upsample_conv(block), x, upsample=2)
            elif isinstance(block, SpatialAttentionBlock):
                x = block(x)
            else:
                raise ValueError(f"tiled VAE: unsupported block {type(block).__name__}")
            i += 1
        return x


def _upsample_conv(block: UpSample) -> nn.Conv2d | nn.Conv3d:
    """The convolution after MONAI's non-trainable nearest x2 upsampling (the only upsampling fused here)."""
    children = dict(block.named_children())
    resize = children.get("upsample_non_trainable")
    if (set(children) != {"upsample_non_trainable", "postconv"} or not isinstance(resize, nn.Upsample)
            or resize.mode != "nearest" or any(float(f) != 2.0 for f in _as_tuple(resize.scale_factor))):
        raise ValueError(f"tiled VAE: unsupported upsampling block {block}")
    return _conv_module(children["postconv"])


def _as_tuple(value: float | Sequence[float] | None) -> tuple[float, ...]:
    if value is None:
        return (0.0,)
    return tuple(value) if isinstance(value, Sequence) else (float(value),)


def _runner(x: Tensor, slab_elements: int) -> _Slabs:
    spatial = list(x.shape[2:])
    return _Slabs(2 + spatial.index(max(spatial)), slab_elements)


@torch.no_grad()
def tiled_encode(autoencoder: AutoencoderKL, x: Tensor, slab_elements: int = DEFAULT_SLAB_ELEMENTS
                 ) -> tuple[Tensor, Tensor]:
    """``autoencoder.encode(x)`` = (mu, sigma) computed slab by slab (see the module docstring)."""
    h = _runner(x, slab_elements).blocks(autoencoder.encoder.blocks, x)
    z_mu = autoencoder.quant_conv_mu(h)
    z_log_var = torch.clamp(autoencoder.quant_conv_log_sigma(h), -30.0, 20.0)
    return z_mu, torch.exp(z_log_var / 2)


@torch.no_grad()
def tiled_decode(autoencoder: AutoencoderKL, z: Tensor, slab_elements: int = DEFAULT_SLAB_ELEMENTS) -> Tensor:
    """``autoencoder.decode(z)`` computed slab by slab (see the module docstring)."""
    h = autoencoder.post_quant_conv(z)
    return _runner(h, slab_elements).blocks(autoencoder.decoder.blocks, h)


__all__ = ["DEFAULT_SLAB_ELEMENTS", "tiled_decode", "tiled_encode"]
