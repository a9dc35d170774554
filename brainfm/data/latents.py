"""Latent shards: the frozen VAE's posterior (mean and std) of every scan of a shard set, for LDM training from disk.

``brainfm data latents --vae RUN/vae/vae --shards SHARDS --out LATENTS`` (or :func:`write_latent_shards`). The LDM
stage reads the set with ``ldm.latent_dir`` through the same resumable reader as image shards, for cohorts whose
latents do not fit in memory (``ldm.cache_latents`` keeps them in RAM, per rank). The posterior mean AND std are
stored, never a sampled latent: a latent sampled once and cached puts a floor under the diffusion loss, so the LDM
draws ``mean + std * eps`` afresh at every step from its own checkpointed generator (``ldm.posterior: sample``).

A separate command, not a step of the VAE stage: it is as resumable as ``brainfm data shards`` on its own (a VAE
stage killed during a long encode would otherwise redo it), it runs anywhere the shards are (the VAE export is one
folder), one VAE serves several shard sets, and the VAE stage's export stays a single-process model write.

Each latent shard mirrors one image shard: the same file name, keys in the same order and the same per-slice brain
voxel counts, so the reader's epoch plan (a pure function of the index and the seed) visits the same scans in the
same order as on the image shards. Members per sample:

- ``latent_mean.npy``, ``latent_std.npy``: unscaled posterior, float32 (or float16): ``(C, *latent grid)`` in 3D;
  in 2D ``(C, h, w, Z)``, the latents of every axial slice stacked on the last axis like the image's slices;
- ``mask.npy``, ``anatomy.npy``, ``meta.json`` (and ``label.npy``): copied byte for byte from the image shard, the
  UNet's anatomy conditioning at image resolution exactly as in training from images.

``index.json`` is the source index (same format, recipe, grid, counts) with this set's shards and a ``latents``
section: the VAE's sha256 (weights + config, so its scaling factor too), latent channels, downsampling, mode and
dtype. Resumable and checksummed like the image shards: a shard is kept when its sidecar fingerprint (source shard
sha256 + VAE sha256 + dtype) matches and its bytes verify; anything else is re-encoded.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds

from brainfm.data.writer import (
    FORMAT,
    INDEX_NAME,
    ShardGroup,
    load_index,
    load_sidecar,
    prepare_out_dir,
    sha256_file,
    write_group,
)
from brainfm.io import BrainFMInputError, write_json

log = logging.getLogger(__name__)

LATENT_FORMAT = "brainfm-latents/1"
COPIED_MEMBERS = ("mask.npy", "anatomy.npy", "label.npy", "meta.json")
VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")


def vae_fingerprint(vae_dir: str | os.PathLike) -> str:
    """sha256 over the VAE's config (scaling factor included) and weights: which VAE made a latent set."""
    folder = Path(vae_dir)
    digest = hashlib.sha256()
    for name in VAE_FILES:
        path = folder / name
        if not path.is_file():
            raise BrainFMInputError(folder, f"no {name}: not a VAE export (RUN/vae/vae)")
        digest.update(name.encode() + b"\0" + bytes.fromhex(sha256_file(path)))
    return digest.hexdigest()


def latent_info(index: dict, where: str | os.PathLike) -> dict[str, Any]:
    """The ``latents`` section of a latent set's index (refusing an image shard set)."""
    info = index.get("latents")
    if not isinstance(info, dict) or info.get("format") != LATENT_FORMAT:
        raise BrainFMInputError(where, "not a latent shard set (write one with `brainfm data latents`)")
    return info


@dataclass
class LatentReport:
    out_dir: Path
    counts: dict[str, int]
    shards_built: int
    shards_kept: int
    seconds: float

    def summary(self) -> str:
        per_split = ", ".join(f"{split} {n}" for split, n in self.counts.items())
        return (f"latent shards in {self.out_dir}: {sum(self.counts.values())} scan(s) ({per_split}); "
                f"{self.shards_built} shard(s) encoded, {self.shards_kept} kept from a previous run; "
                f"{self.seconds:.1f} s")


def _raw_samples(url: str) -> Iterator[dict[str, Any]]:
    yield from wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples())


@torch.no_grad()
def _posterior(vae: Any, image: np.ndarray, batch: int, tiled: bool) -> tuple[np.ndarray, np.ndarray]:
    """Unscaled (mean, std) of one (1, X, Y, Z) image: one volume in 3D, its axial slices in 2D."""
    x = torch.from_numpy(image.astype(np.float32))
    if vae.config.spatial_dims == 3:
        mu, sigma = vae.encode(x[None], tiled=tiled)
        return mu[0].numpy(), sigma[0].numpy()
    slices = x[0].permute(2, 0, 1)[:, None].contiguous()  # (Z, 1, X, Y)
    parts = [vae.encode(slices[i:i + batch], tiled=tiled) for i in range(0, len(slices), batch)]
    mu = torch.cat([p[0] for p in parts]).permute(1, 2, 3, 0)  # (C, h, w, Z)
    sigma = torch.cat([p[1] for p in parts]).permute(1, 2, 3, 0)
    return mu.contiguous().numpy(), sigma.contiguous().numpy()


def _encode_shard(url: str, entry: dict, vae: Any, dtype: np.dtype, batch: int, tiled: bool) -> Iterator[dict]:
    """``write_group`` results for one image shard, in its index order (a shard that disagrees with its index is
    refused: the epoch plan would no longer describe the latent set)."""
    keys = list(entry["keys"])
    seen = []
    for raw, voxels in zip(_raw_samples(url), entry["slice_brain_voxels"], strict=False):
        key = raw["__key__"]
        seen.append(key)
        if len(seen) > len(keys) or key != keys[len(seen) - 1] or "image.npy" not in raw:
            raise BrainFMInputError(url, f"sample {key!r} does not match the index: rebuild the image shards")
        image = np.load(io.BytesIO(raw["image.npy"]), allow_pickle=False)
        mean, std = _posterior(vae, image, batch, tiled)
        members = {"latent_mean.npy": np.ascontiguousarray(mean.astype(dtype)),
                   "latent_std.npy": np.ascontiguousarray(std.astype(dtype))}
        members.update({name: raw[name] for name in COPIED_MEMBERS if name in raw})
        meta = json.loads(raw["meta.json"])
        yield {"key": key, "members": members, "slice_brain_voxels": list(voxels),
               "anatomy_channels": int(meta.get("anatomy_channels", 0)),
               "sample": {k: meta.get(k) for k in ("subject", "modality", "dataset", "site")}}
    if seen != keys:
        raise BrainFMInputError(url, f"holds {len(seen)} sample(s), its index lists {len(keys)}: rebuild the shards")


def write_latent_shards(vae_dir: str | os.PathLike, shard_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                        splits: Sequence[str] = ("train",), dtype: Literal["float32", "float16"] = "float32",
                        batch: int = 16, tiled: bool = False) -> LatentReport:
    """Encode ``splits`` of the image shards in ``shard_dir`` with the VAE export ``vae_dir`` into ``out_dir``;
    resumable (finished shards are verified and kept). ``batch``: 2D slices per encoder call; ``tiled``: the
    memory-bounded encoder (:mod:`brainfm.models.tiling`) for large volumes."""
    from tqdm.auto import tqdm

    from brainfm.models.vae import BrainVAE
    from brainfm.version import __version__

    started = time.perf_counter()
    shards, out = Path(shard_dir), Path(out_dir)
    if dtype not in ("float32", "float16"):
        raise BrainFMInputError(None, f"latent dtype must be float32 or float16, got {dtype!r}")
    source = load_index(shards)
    if "latents" in source:
        raise BrainFMInputError(shards, "is a latent set already; give the image shards it was made from")
    missing = [s for s in splits if s not in source["splits"]]
    if missing or not splits:
        raise BrainFMInputError(shards / INDEX_NAME, f"no split(s) {missing or []}; have {sorted(source['splits'])}")
    fingerprint = vae_fingerprint(vae_dir)
    vae = BrainVAE.from_pretrained(str(vae_dir)).eval()
    vae.requires_grad_(False)
    groups = []
    for split in splits:
        for entry in source["splits"][split]:
            payload = [LATENT_FORMAT, FORMAT, entry["sha256"], fingerprint, dtype]
            groups.append((ShardGroup(entry["name"], split, list(entry["keys"]),
                                      hashlib.sha256(json.dumps(payload).encode()).hexdigest()), entry))
    prepare_out_dir(out, {g.name for g, _ in groups})
    records, built = {}, 0
    progress = tqdm(total=sum(len(g.rows) for g, _ in groups), desc="latents", unit="scan", disable=None)
    try:
        for group, entry in groups:
            record = load_sidecar(out, group)
            if record is None:
                url = shards / entry["name"]
                if not url.is_file() or sha256_file(url) != entry["sha256"]:
                    raise BrainFMInputError(url, "missing or not the shard its index describes (sha256)")
                results = _encode_shard(str(url), entry, vae, np.dtype(dtype), batch, tiled)
                record = write_group(out, group, _counted(results, progress), _never_rejected)
                built += 1
            else:
                progress.update(len(group.rows))
            records[group.name] = record
    finally:
        progress.close()
    index = {k: v for k, v in source.items() if k not in ("splits", "created", "brainfm_version")}
    index.update({
        "brainfm_version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "modalities": {s: source["modalities"][s] for s in splits if s in source.get("modalities", {})},
        "counts": {s: source["counts"][s] for s in splits if s in source.get("counts", {})},
        "splits": {split: [{k: records[g.name][k] for k in ("name", "n_samples", "sha256", "bytes", "keys",
                                                             "slice_brain_voxels")}
                           for g, _ in groups if g.split == split] for split in splits},
        "latents": {
            "format": LATENT_FORMAT, "vae_sha256": fingerprint, "vae_dir": str(Path(vae_dir).resolve()),
            "source_index_sha256": sha256_file(shards / INDEX_NAME), "source": str(shards.resolve()),
            "mode": "3d" if vae.config.spatial_dims == 3 else "2d", "latent_channels": vae.config.latent_channels,
            "downsample_factor": vae.downsample_factor, "scaling_factor": vae.config.scaling_factor, "dtype": dtype,
        },
    })
    write_json(out / INDEX_NAME, index)
    counts = {split: sum(records[g.name]["n_samples"] for g, _ in groups if g.split == split) for split in splits}
    return LatentReport(out, counts, built, len(groups) - built, time.perf_counter() - started)


def _counted(results: Iterator[dict], progress: Any) -> Iterator[dict]:
    for result in results:
        progress.update(1)
        yield result


def _never_rejected(rejection: Any) -> None:
    raise AssertionError(f"latent encoding does not reject samples: {rejection}")


__all__ = ["LATENT_FORMAT", "LatentReport", "latent_info", "vae_fingerprint", "write_latent_shards"]
