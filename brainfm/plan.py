"""Memory planner for pretraining runs: how big each network is, how much memory one sample costs, what one GPU
holds under DDP, DeepSpeed ZeRO-2/ZeRO-3 and FSDP, and the largest micro-batch that fits.

Activations are not guessed from layer formulas: one training step of the real networks (the trainer's losses,
``train.mixed_precision`` and ``train.gradient_checkpointing`` included) runs on *fake* tensors
(``torch._subclasses.FakeTensorMode``: shapes and dtypes, no storage), and a dispatch mode counts the bytes of
every storage alive after each operation. That gives the peak exactly as the allocator would see it, minus
allocator rounding and fragmentation; batch 1 and 2 give the per-sample slope. The states a strategy shards
(weights, gradients, AdamW moments, the EMA copy, communication buckets) are counted from the parameter counts
with the byte sizes below. ``tests/test_plan.py`` compares the single-process prediction with the measured
peak of real training steps on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from brainfm.config import PretrainConfig
from brainfm.io import BrainFMInputError

Stage = Literal["vae", "ldm"]
STRATEGIES = ("ddp", "zero2", "zero3", "fsdp")
GIB = 2**30
# What a GPU loses before the first tensor: CUDA context, cuDNN/cuBLAS workspaces, NCCL buffers (measured
# 0.5-1.5 GiB on A100/H100 with PyTorch 2.x), and the caching allocator's fragmentation headroom.
GPU_RESERVED_BYTES = int(1.5 * GIB)
FRAGMENTATION = 0.10
# DeepSpeed defaults for the keys configs/deepspeed/*.json may leave out (elements, not bytes)
DEEPSPEED_DEFAULTS = {"reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7}
FSDP_MIN_PARAMS = 1_000_000  # configs/accelerate/fsdp.yaml: SIZE_BASED_WRAP, fsdp_min_num_params
DTYPE_BYTES = {"no": 4, "bf16": 2, "fp16": 2}


# ------------------------------------------------------------------------------------------------ fake step
class PeakBytes(TorchDispatchMode):
    """Bytes of tensor storage alive, updated after every dispatched operation; ``peaks[phase]`` is the maximum
    while ``phase`` was current (see ``enter``).

    Storages that existed before entering (weights) are not counted; a storage is counted once however many
    views share it, and stops counting when it is freed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.phase = "step"
        self.peaks: dict[str, int] = {}
        self._sizes: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()

    def enter(self, phase: str) -> None:
        self.phase = phase
        self.peaks[phase] = max(self.peaks.get(phase, 0), self.live)

    def _add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self._sizes:
            return
        size = storage.nbytes()
        self._sizes[storage] = size
        self.live += size
        weakref.finalize(storage, self._free, size)
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), self.live)

    def _free(self, size: int) -> None:
        self.live -= size

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._add(tensor)
        return out


@dataclasses.dataclass(frozen=True)
class Component:
    """One network of a stage; frozen ones keep only their weights on the GPU (no gradients or moments)."""

    name: str
    params: int
    trainable: bool


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Per-sample tensor shapes the reader produces for a config: image, brain mask and anatomy priors."""

    image: tuple[int, ...]  # (channels, *spatial)
    anatomy_channels: int  # tissue priors (the mask is one more channel)
    latent_channels: int
    downsample: int

    @property
    def spatial(self) -> tuple[int, ...]:
        return self.image[1:]

    @property
    def latent(self) -> tuple[int, ...]:
        return (self.latent_channels, *(s // self.downsample for s in self.spatial))


def data_shapes(config: PretrainConfig, grid: Sequence[int] | None = None) -> Shapes:
    """Shapes from ``grid`` (the shard grid, X x Y x Z voxels) or the shard index of ``config.data.shard_dir``.
    2D configs train on axial slices: the first two axes."""
    anatomy = 2
    if grid is None:
        index_path = Path(config.data.shard_dir) / "index.json"
        if not index_path.is_file():
            raise BrainFMInputError(index_path, "no shard index to read the grid shape from; pass the grid shape "
                                                "(brainfm plan --shape XxYxZ)")
        index = json.loads(index_path.read_bytes())
        grid = index["grid_shape"]
        anatomy = int(index.get("anatomy_channels") or anatomy)
    grid = tuple(int(g) for g in grid)
    if len(grid) != 3 or min(grid) < 1:
        raise BrainFMInputError(None, f"grid shape must be three positive sizes X x Y x Z, got {grid}")
    spatial = grid[:2] if config.spatial_dims == 2 else grid
    vae = config.vae.network
    downsample = 2 ** (len(vae.channels) - 1)
    if any(s % downsample for s in spatial):
        raise BrainFMInputError(None, f"grid {spatial} is not divisible by the VAE's downsampling {downsample}")
    return Shapes((1, *spatial), anatomy, int(vae.latent_channels), downsample)


def build_networks(config: PretrainConfig, stage: Stage, shapes: Shapes) -> dict[str, nn.Module]:
    """The networks of a stage as the trainer builds them (random weights). The LDM stage's VAE is frozen."""
    from brainfm.models.vae import BrainVAE, make_discriminator

    dims, channels = config.spatial_dims, shapes.image[0]
    vae = BrainVAE(**dict(config.vae.network), spatial_dims=dims, in_channels=channels, out_channels=channels,
                   scaling_factor=1.0)
    if stage == "vae":
        networks: dict[str, nn.Module] = {"vae": vae}
        if config.vae.adv_weight > 0:
            networks["discriminator"] = make_discriminator(dims, channels, **dict(config.vae.discriminator))
        if config.vae.perceptual_weight > 0:
            from monai.networks.nets.resnet import ResNetFeatures

            networks["perceptual"] = ResNetFeatures("resnet10", pretrained=False, spatial_dims=dims,
                                                    in_channels=1).requires_grad_(False).eval()
        return networks
    from brainfm.models.conditioning import Conditioner
    from brainfm.models.unet import LatentUNet

    ldm = config.ldm
    unet = LatentUNet(**dict(ldm.unet), spatial_dims=dims, latent_channels=shapes.latent_channels,
                      anatomy_channels=1 + shapes.anatomy_channels, prediction_type=ldm.prediction_type)
    return {"unet": unet, "conditioner": Conditioner(**dict(ldm.conditioner)),
            "vae (frozen)": vae.requires_grad_(False).eval()}


def _trainable(networks: dict[str, nn.Module]) -> list[nn.Module]:
    return [m for m in networks.values() if any(p.requires_grad for p in m.parameters())]


def make_batch(shapes: Shapes, batch: int, dtype: torch.dtype = torch.float32, latents: bool = False
               ) -> dict[str, Any]:
    """A batch as the reader (or, with ``latents``, the latent cache) delivers it; the slice position rides in
    the metadata (a tensor of it would need real values, which fake tensors do not have)."""
    spatial = shapes.spatial
    meta = [{"modality": "T1", "sex": "F", "site": "unknown", "age": 50.0,
             "slice_position": 0.5,
             "scalars": {"brain_volume_ml": 1150.0, "gm_fraction": 0.45, "wm_fraction": 0.35}}] * batch
    out = {"image": torch.rand(batch, *shapes.image, dtype=dtype), "mask": torch.ones(batch, 1, *spatial, dtype=dtype),
           "anatomy": torch.rand(batch, shapes.anatomy_channels, *spatial, dtype=dtype), "meta": meta}
    if latents:
        out["latent_mean"], out["latent_std"] = torch.randn(batch, *shapes.latent), torch.rand(batch, *shapes.latent)
    return out


def step_losses(config: PretrainConfig, stage: Stage, networks: dict[str, nn.Module],
                batch: dict[str, Any], scheduler: Any = None) -> list[torch.Tensor]:
    """The losses of one training step at full strength (the VAE stage past its adversarial warm-up), with the
    tensors the trainer's tasks create; each is backpropagated on its own."""
    if stage == "vae":
        from brainfm.models.losses import VAELoss

        vae_cfg = config.vae
        loss = VAELoss(vae_cfg.kl_weight, vae_cfg.adv_weight, 0.0, None, config.spatial_dims)
        if "perceptual" in networks:  # the trainer loads weights from a file; the architecture is what counts
            from brainfm.models.losses import ResNetPerceptualLoss

            perceptual = ResNetPerceptualLoss.__new__(ResNetPerceptualLoss)
            nn.Module.__init__(perceptual)
            perceptual.network = networks["perceptual"]
            loss.perceptual, loss.perceptual_weight = perceptual, vae_cfg.perceptual_weight
        image = batch["image"]
        recon, mu, sigma = networks["vae"](image)
        disc = networks.get("discriminator")
        fake_logits = None
        if disc is not None:
            disc.requires_grad_(False)
            fake_logits = disc(recon.float())
            disc.requires_grad_(True)
        total, _ = loss.generator_loss(image, recon, mu, sigma, fake_logits)
        losses = [total]
        if disc is not None:
            real, fake = disc(torch.cat([image, recon.detach().float()])).chunk(2)
            losses.append(loss.discriminator_loss(real, fake))
        return losses
    if "latent_mean" in batch:  # ldm.cache_latents or ldm.latent_dir: the posterior comes from memory or disk
        latents = batch["latent_mean"] + batch["latent_std"] * torch.randn_like(batch["latent_std"])
    else:
        with torch.no_grad():
            latents = networks["vae (frozen)"].encode_latent(batch["image"]).float()
    conditioner, unet = networks["conditioner"], networks["unet"]
    tokens = conditioner.tokenize(batch["meta"], batch.get("slice_position"))
    anatomy = torch.cat([batch["mask"], batch["anatomy"]], dim=1)
    # diffusion_loss's tensors without its data-dependent checks (fake tensors have no values to test)
    n = latents.shape[0]
    timesteps = torch.randint(0, config.ldm.num_train_timesteps, (n,))
    noise = torch.randn_like(latents)
    drop = torch.rand(n) < config.ldm.cond_drop_prob
    alpha = scheduler.alphas_cumprod[timesteps].to(latents.dtype).reshape(-1, *[1] * (latents.ndim - 1))
    z_t = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
    prediction = unet(z_t, timesteps, anatomy, conditioner(tokens, drop_mask=drop), anatomy_drop_mask=drop)
    target = noise if config.ldm.prediction_type == "epsilon" else alpha.sqrt() * noise - (1 - alpha).sqrt() * latents
    return [torch.nn.functional.mse_loss(prediction.float(), target.float())]


def _ema_modules(stage: Stage, networks: dict[str, nn.Module]) -> list[nn.Module]:
    """The exported model the trainer keeps an EMA copy of: the VAE, or the UNet + conditioner."""
    return [networks["vae"]] if stage == "vae" else [networks["unet"], networks["conditioner"]]


def _optimizer_groups(stage: Stage, networks: dict[str, nn.Module]) -> list[list[nn.Parameter]]:
    """One AdamW per trained objective, as the tasks build them."""
    if stage == "vae":
        return [list(m.parameters()) for k, m in networks.items() if k in ("vae", "discriminator")]
    return [[*networks["unet"].parameters(), *networks["conditioner"].parameters()]]


def _cast_inputs(dtype: torch.dtype) -> Callable[[nn.Module, tuple], tuple]:
    def hook(module: nn.Module, args: tuple) -> tuple:
        return torch.utils._pytree.tree_map_only(
            torch.Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t, args)
    return hook


@contextmanager
def _fake_mode() -> Iterator[None]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        yield


def trace_peak(config: PretrainConfig, stage: Stage, shapes: Shapes, batch_size: int, *,
               cast_weights: bool = False, keep_grads: bool = True) -> dict[str, int]:
    """Peak bytes of everything one process allocates during one training step, weights and buffers excluded,
    on fake tensors: ``{"step": forward + backward, "update": clipping, AdamW and EMA}`` (AdamW's moments
    already created). The losses run under autocast when ``train.mixed_precision`` is set, as the trainer runs
    them (accelerate's autocast; under DeepSpeed the trainer's own).

    ``cast_weights=False``: fp32 weights (one GPU and DDP); ``True``: weights and inputs in the compute dtype
    (DeepSpeed casts the module, FSDP's mixed-precision policy its parameters and inputs). ``keep_grads=True``:
    gradients stay until AdamW and the EMA step (whose moments and copy are created inside and counted);
    ``False``: each gradient is dropped once complete (it leaves for its shard) and nothing is updated, which
    leaves the activations and the backward's temporaries.
    """
    from diffusers.training_utils import EMAModel

    from brainfm.diffusion.schedulers import make_scheduler

    precision = config.train.mixed_precision
    compute = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    with _fake_mode():
        networks = build_networks(config, stage, shapes)
        trained = _trainable(networks)
        if config.train.gradient_checkpointing:  # as the tasks do: the VAE, or the UNet
            networks["vae" if stage == "vae" else "unet"].enable_gradient_checkpointing()
        scheduler = None
        if stage == "ldm":
            ldm = config.ldm
            scheduler = make_scheduler(ldm.noise_scheduler, ldm.num_train_timesteps, ldm.beta_schedule,
                                       ldm.prediction_type)
        optimizers: list[torch.optim.Optimizer] = []
        for module in trained:
            for param in (p for p in module.parameters() if p.requires_grad):  # frozen parts stay as built
                if cast_weights:
                    param.data = param.data.to(compute)
                if not keep_grads:
                    param.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
            if cast_weights:
                module.register_forward_pre_hook(_cast_inputs(compute))  # as FSDP's cast_forward_inputs
        tracker = PeakBytes()
        with tracker:
            ema = None
            if keep_grads:
                optimizers = [torch.optim.AdamW(group, lr=1e-4, foreach=True)
                              for group in _optimizer_groups(stage, networks)]
                if config.train.ema_decay is not None:
                    ema_params = [p for m in _ema_modules(stage, networks) for p in m.parameters()]
                    ema = EMAModel(ema_params, decay=config.train.ema_decay, use_ema_warmup=False, foreach=True)
                for optimizer in optimizers:  # a first update creates AdamW's moments, as step 1 would
                    for group in optimizer.param_groups:
                        for param in group["params"]:
                            if param.requires_grad:
                                param.grad = torch.zeros_like(param)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            tracker.enter("step")
            from_memory = stage == "ldm" and bool(config.ldm.cache_latents or config.ldm.latent_dir)
            batch = make_batch(shapes, batch_size, latents=from_memory)
            autocast = torch.autocast("cpu", dtype=compute, enabled=precision != "no")
            with autocast:
                losses = step_losses(config, stage, networks, batch, scheduler)
            for loss in losses:
                loss.backward()
            del losses, batch
            tracker.enter("update")
            for optimizer in optimizers:
                for group in optimizer.param_groups:
                    torch.nn.utils.clip_grad_norm_(group["params"], 1.0, foreach=True)
                optimizer.step()
            if ema is not None:
                ema.step(ema_params)
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
        return {"update": 0, **tracker.peaks}


def resident_bytes(networks: dict[str, nn.Module]) -> int:
    """Weights and buffers as built (fp32)."""
    return sum(t.numel() * t.element_size() for m in networks.values()
               for t in (*m.parameters(), *m.buffers()))


# ------------------------------------------------------------------------------------------------ strategies
@dataclasses.dataclass(frozen=True)
class StrategyMemory:
    """Per-GPU bytes under one strategy: ``resident`` always held, plus the larger of the forward/backward peak
    (``step_one`` at batch 1, ``per_sample`` more per extra sample) and the update peak (``update``)."""

    strategy: str
    resident: int
    step_one: int
    per_sample: int
    update: int
    problem: str = ""  # why the trainer refuses this strategy for this config ("" = runs)

    def bytes_at(self, batch: int) -> int:
        return self.resident + max(self.step_one + (batch - 1) * self.per_sample, self.update)

    def max_batch(self, usable: int) -> int:
        """Largest micro-batch per GPU whose peak fits in ``usable`` bytes (0: not even one sample)."""
        if self.bytes_at(1) > usable:
            return 0
        if self.per_sample <= 0:
            return 10**6
        return 1 + (usable - self.resident - self.step_one) // self.per_sample


@dataclasses.dataclass(frozen=True)
class StagePlan:
    stage: Stage
    spatial: tuple[int, ...]
    batch_size: int
    components: tuple[Component, ...]
    activation_per_sample: int  # forward/backward bytes per extra sample, one GPU / DDP (mixed precision as set)
    strategies: tuple[StrategyMemory, ...]


def _module_sizes(module: nn.Module) -> tuple[int, int]:
    """(largest FSDP unit, parameters left to the root) under SIZE_BASED_WRAP with ``FSDP_MIN_PARAMS``."""
    units: list[int] = []

    def unwrapped(mod: nn.Module) -> int:
        count = sum(p.numel() for p in mod.parameters(recurse=False))
        for child in mod.children():
            size = unwrapped(child)
            if size >= FSDP_MIN_PARAMS:
                units.append(size)
            else:
                count += size
        return count

    root = unwrapped(module)
    return max(units, default=0), root


def _largest_module(modules: Sequence[nn.Module]) -> int:
    """The most parameters one submodule owns directly: what ZeRO-3 gathers at once besides its prefetch."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for top in modules for m in top.modules()),
               default=0)


def _traces(config: PretrainConfig, stage: Stage, shapes: Shapes, cast_weights: bool) -> tuple[int, int]:
    """(forward/backward peak at batch 1, bytes per extra sample) without gradients kept: the activations."""
    one, two = (trace_peak(config, stage, shapes, b, cast_weights=cast_weights, keep_grads=False)["step"]
                for b in (1, 2))
    return one, two - one


def _ddp(config: PretrainConfig, stage: Stage, shapes: Shapes, networks: dict[str, nn.Module], gpus: int,
         activations: tuple[int, int]) -> StrategyMemory:
    """One GPU (``gpus=1``) or DDP: fp32 weights, autocast; the traced step at batch 1 (gradients, AdamW moments
    and the EMA copy included) grows by the activations of each further sample."""
    trained = _trainable(networks)
    p_trained = sum(p.numel() for m in trained for p in m.parameters() if p.requires_grad)
    full = trace_peak(config, stage, shapes, 1)
    per_sample = activations[1]
    bucket = 4 * p_trained if gpus > 1 else 0  # DDP's gradient buckets: a second copy of the gradients
    return StrategyMemory("ddp", resident_bytes(networks) + bucket, full["step"], per_sample, full["update"])


def single_process_bytes(config: PretrainConfig, stage: Stage, shapes: Shapes, batch_size: int) -> int:
    """Predicted peak bytes of one process training ``stage`` alone (one GPU, no sharding) at ``batch_size``."""
    with _fake_mode():
        networks = build_networks(config, stage, shapes)
        activations = _traces(config, stage, shapes, cast_weights=False)
        return _ddp(config, stage, shapes, networks, 1, activations).bytes_at(batch_size)


def _sharded(config: PretrainConfig, networks: dict[str, nn.Module], stage: Stage, gpus: int,
             activations: tuple[int, int]) -> list[StrategyMemory]:
    """ZeRO-2, ZeRO-3 and FSDP: weights in the compute dtype; the states they split are counted from the
    parameter counts."""
    trained = _trainable(networks)
    p_trained = sum(p.numel() for m in trained for p in m.parameters() if p.requires_grad)
    p_ema = sum(p.numel() for m in _ema_modules(stage, networks) for p in m.parameters())  # EMAModel copies all
    frozen = resident_bytes({k: m for k, m in networks.items() if m not in trained})
    buffers = sum(b.numel() * b.element_size() for m in trained for b in m.buffers())
    n, w = gpus, DTYPE_BYTES[config.train.mixed_precision]
    ema = config.train.ema_decay is not None
    act_step, act_slope = activations
    # DeepSpeed: the module in the compute dtype; fp32 master weights, AdamW moments and the fp32 gradient
    # partition (4 + 8 + 4 bytes, or 8 + 4 without mixed precision) are split over the GPUs.
    master = 16 if w < 4 else 12
    reduce = 2 * w * min(p_trained, int(2e8))  # reduce_bucket_size of configs/deepspeed/*.json, double-buffered
    problem = ""
    if stage == "vae" and "discriminator" in networks:
        problem = "two optimizers (generator + discriminator): one DeepSpeed engine holds one; vae.adv_weight: 0"
    elif config.train.nonfinite_policy == "skip":
        problem = "train.nonfinite_policy: skip is not possible under DeepSpeed (use abort)"
    ema_ds = 4 * p_ema if ema else 0  # the trainer keeps the EMA copy in fp32 whatever the weights
    zero2 = StrategyMemory("zero2", w * p_trained + master * p_trained // n + reduce
                           + w * min(p_trained, int(2e8)) + ema_ds + buffers + frozen,
                           act_step, act_slope, 8 * p_trained // n, problem)
    gathered = w * (min(p_trained, int(5e7)) + 2 * _largest_module(trained))  # stage3_prefetch_bucket_size + live modules
    zero3 = StrategyMemory("zero3", (w + master) * p_trained // n + gathered + reduce + buffers + frozen,
                           act_step, act_slope, 8 * p_trained // n,
                           problem or ("EMA over ZeRO-3 partitioned weights is not supported (train.ema_decay: "
                                       "null)" if ema else ""))
    unit, root = max((_module_sizes(m) for m in trained), default=(0, 0))
    fsdp = StrategyMemory("fsdp", (16 * p_trained + (4 * p_ema if ema else 0)) // n + w * (root + 3 * unit)
                          + buffers + frozen, act_step, act_slope, 8 * p_trained // n)
    return [zero2, zero3, fsdp]


def plan_stage(config: PretrainConfig, stage: Stage, shapes: Shapes, gpus: int = 1) -> StagePlan:
    """Parameter counts, activation memory and per-GPU memory of every strategy for one stage."""
    with _fake_mode():
        networks = build_networks(config, stage, shapes)
        components = tuple(Component(k, sum(p.numel() for p in m.parameters()),
                                     any(p.requires_grad for p in m.parameters())) for k, m in networks.items())
        replicated = _traces(config, stage, shapes, cast_weights=False)
        # without mixed precision, casting the weights changes nothing: the same trace serves both
        cast = replicated if config.train.mixed_precision == "no" else _traces(config, stage, shapes, True)
        ddp = _ddp(config, stage, shapes, networks, gpus, replicated)
        strategies = (ddp, *_sharded(config, networks, stage, gpus, cast))
    return StagePlan(stage, shapes.spatial, config.data.batch_size, components, ddp.per_sample, strategies)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """What ``brainfm plan`` prints: one :class:`StagePlan` per stage, for ``gpus`` GPUs of ``gpu_mem_gib``."""

    config: str
    gpus: int
    gpu_mem_gib: float
    precision: str
    gradient_checkpointing: bool
    stages: tuple[StagePlan, ...]

    @property
    def usable_bytes(self) -> int:
        return int(self.gpu_mem_gib * GIB * (1 - FRAGMENTATION)) - GPU_RESERVED_BYTES

    def summary(self) -> str:
        def gib(size: int) -> str:
            return f"{size / GIB:.2f}" if size >= GIB / 100 else f"{size / GIB:.4f}"

        lines = [f"{self.config}: {self.gpus} GPU(s) x {self.gpu_mem_gib:g} GiB ({gib(self.usable_bytes)} GiB "
                 f"usable after {gib(GPU_RESERVED_BYTES)} GiB reserved and {FRAGMENTATION:.0%} headroom), "
                 f"mixed precision {self.precision}, gradient checkpointing "
                 f"{'on' if self.gradient_checkpointing else 'off'}"]
        for stage in self.stages:
            shape = "x".join(map(str, stage.spatial))
            parts = ", ".join(f"{c.name} {c.params / 1e6:.2f}M{'' if c.trainable else ' frozen'}"
                              for c in stage.components)
            lines += ["", f"stage {stage.stage} at {shape}: {parts}",
                      f"  activations: {gib(stage.activation_per_sample)} GiB per sample (one GPU / DDP)",
                      f"  {'strategy':<8} {'GiB/GPU @ batch ' + str(stage.batch_size):>18} {'largest batch':>14}"]
            for s in stage.strategies:
                fits = s.max_batch(self.usable_bytes)
                note = f"  refused: {s.problem}" if s.problem else ""
                lines.append(f"  {s.strategy:<8} {gib(s.bytes_at(stage.batch_size)):>18} {fits:>14}{note}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "usable_bytes": self.usable_bytes}


def plan_memory(config: PretrainConfig, *, name: str = "config", grid: Sequence[int] | None = None,
                gpus: int = 1, gpu_mem_gib: float = 80.0, stages: Sequence[Stage] = ("vae", "ldm")) -> MemoryPlan:
    """The memory plan of ``config`` on ``gpus`` GPUs of ``gpu_mem_gib`` GiB (``grid``: the shard grid X x Y x Z;
    default: the shard index's)."""
    if gpus < 1 or gpu_mem_gib * GIB * (1 - FRAGMENTATION) <= GPU_RESERVED_BYTES:
        raise BrainFMInputError(None, f"need gpus >= 1 and more than {GPU_RESERVED_BYTES / GIB:g} GiB per GPU "
                                      f"(reserved for the CUDA context), got {gpus} and {gpu_mem_gib:g}")
    shapes = data_shapes(config, grid)
    return MemoryPlan(name, gpus, gpu_mem_gib, config.train.mixed_precision, config.train.gradient_checkpointing,
                      tuple(plan_stage(config, stage, shapes, gpus) for stage in stages))
