"""Latent shards (``brainfm data latents``): what they hold, resumable and checksummed writing, and LDM training from
them: the same loss sequence as training from the image shards with the same VAE and noise, and an exact resume."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from brainfm.cli import main
from brainfm.data.latents import write_latent_shards
from brainfm.data.reader import make_dataloader
from brainfm.data.writer import load_index
from brainfm.io import BrainFMInputError
from brainfm.models.vae import BrainVAE
from brainfm.train.pretrain import pretrain


def _vae(tmp: Path, dims: int) -> Path:
    """An untrained tiny VAE export (the latents only need to be this VAE's, not good ones)."""
    torch.manual_seed(0)
    vae = BrainVAE(spatial_dims=dims, channels=(8, 16), latent_channels=2, attention_levels=(False, False),
                   norm_num_groups=8, scaling_factor=0.8)
    vae.save_pretrained(tmp / f"vae{dims}d", safe_serialization=True)
    return tmp / f"vae{dims}d"


@pytest.fixture(scope="module")
def latent_set(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("latents")
    vae_dir = _vae(root, 3)
    report = write_latent_shards(vae_dir, tiny_shards, root / "latents3d")
    return {"root": root, "vae": vae_dir, "out": root / "latents3d", "report": report}


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "logs" / "losses.jsonl").read_text(encoding="utf-8").splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in lines]


def test_latent_shards_hold_the_posterior_and_the_anatomy_of_every_scan(latent_set, tiny_shards) -> None:
    vae = BrainVAE.from_pretrained(str(latent_set["vae"])).eval()
    index, source = load_index(latent_set["out"]), load_index(tiny_shards)
    assert [e["keys"] for e in index["splits"]["train"]] == [e["keys"] for e in source["splits"]["train"]]
    assert index["latents"]["mode"] == "3d" and index["latents"]["scaling_factor"] == pytest.approx(0.8)
    assert latent_set["report"].counts == {"train": 6} and latent_set["report"].shards_built == len(
        source["splits"]["train"])
    images = {b["meta"][0]["key"]: b for b in make_dataloader(tiny_shards, "train", mode="3d", batch_size=1)}
    latents = list(make_dataloader(latent_set["out"], "train", mode="3d", batch_size=1))
    assert len(latents) == 6 and "image" not in latents[0]
    for batch in latents:
        image = images[batch["meta"][0]["key"]]
        with torch.no_grad():
            mu, sigma = vae.encode(image["image"])
        assert batch["latent_mean"].shape == (1, 2, 20, 24, 20)
        torch.testing.assert_close(batch["latent_mean"], mu, atol=1e-5, rtol=0)
        torch.testing.assert_close(batch["latent_std"], sigma, atol=1e-5, rtol=0)
        assert torch.equal(batch["mask"], image["mask"]) and torch.equal(batch["anatomy"], image["anatomy"])
        assert batch["meta"][0]["subject"] == image["meta"][0]["subject"]


def test_2d_latents_are_the_slices_latents_stacked(tiny_shards, tmp_path) -> None:
    vae_dir = _vae(tmp_path, 2)
    write_latent_shards(vae_dir, tiny_shards, tmp_path / "latents2d", dtype="float16", batch=7)
    vae = BrainVAE.from_pretrained(str(vae_dir)).eval()
    image = next(iter(make_dataloader(tiny_shards, "train", mode="2d", batch_size=4, seed=3)))
    latent = next(iter(make_dataloader(tmp_path / "latents2d", "train", mode="2d", batch_size=4, seed=3)))
    assert torch.equal(latent["slice_index"], image["slice_index"])  # the same epoch plan, slice for slice
    with torch.no_grad():
        mu, sigma = vae.encode(image["image"])
    assert latent["latent_mean"].shape == mu.shape == (4, 2, 20, 24)
    torch.testing.assert_close(latent["latent_mean"], mu, atol=2e-3, rtol=2e-3)  # float16 storage
    torch.testing.assert_close(latent["latent_std"], sigma, atol=2e-3, rtol=2e-3)


def test_writing_resumes_verifies_and_refuses_what_it_cannot_use(latent_set, tiny_shards, tmp_path) -> None:
    out, vae_dir = tmp_path / "copy", latent_set["vae"]
    shutil.copytree(latent_set["out"], out)
    names = sorted(p.name for p in out.glob("*.tar"))
    digests = {e["name"]: e["sha256"] for e in load_index(out)["splits"]["train"]}
    assert len(names) == 2
    (out / names[0]).unlink()  # a shard lost ...
    (out / f".{names[0]}.x.tmp.tar").write_bytes(b"left by a killed run")
    report = write_latent_shards(vae_dir, tiny_shards, out)
    assert (report.shards_built, report.shards_kept) == (1, 1)
    assert not list(out.glob(".*tmp*"))
    data = bytearray((out / names[1]).read_bytes())  # ... and a shard damaged
    data[len(data) // 2] ^= 0xFF
    (out / names[1]).write_bytes(bytes(data))
    report = write_latent_shards(vae_dir, tiny_shards, out)
    assert (report.shards_built, report.shards_kept) == (1, 1)
    assert {e["name"]: e["sha256"] for e in load_index(out)["splits"]["train"]} == digests  # deterministic bytes
    with pytest.raises(BrainFMInputError, match="no split"):
        write_latent_shards(vae_dir, tiny_shards, tmp_path / "other", splits=("val",))
    with pytest.raises(BrainFMInputError, match="is a latent set already"):
        write_latent_shards(vae_dir, out, tmp_path / "other")
    assert main(["data", "latents", "--vae", str(vae_dir), "--shards", str(tiny_shards), "--out", str(out)]) == 0


def test_ldm_from_latent_shards_equals_ldm_from_images_and_resumes_exactly(latent_set, tiny_shards, tiny_config,
                                                                          tmp_path) -> None:
    def config(out: Path, latent_dir: Path | None, posterior: str = "sample"):
        made = tiny_config("3d", tiny_shards, out, optim={"max_steps": 4}, train={"checkpoint_every": 2})
        made.ldm = dataclasses.replace(made.ldm, vae_path=str(latent_set["vae"]), posterior=posterior,
                                       latent_dir=None if latent_dir is None else str(latent_dir))
        return made

    from_images = pretrain("ldm", config(tmp_path / "images", None))
    from_latents = pretrain("ldm", config(tmp_path / "latents", latent_set["out"]))
    ours, theirs = _records(from_latents), _records(from_images)
    assert [r["step"] for r in ours] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["losses"]["denoiser"] for r in ours], [r["losses"]["denoiser"] for r in theirs],
                               rtol=1e-4)
    # the same posterior noise matters: the mean alone gives other losses
    mean_only = pretrain("ldm", config(tmp_path / "mean", latent_set["out"], posterior="mean"))
    assert [r["losses"] for r in _records(mean_only)] != [r["losses"] for r in ours]

    weights = load_file(from_latents / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    shutil.rmtree(from_latents / "checkpoints" / "step-4")  # as if killed after the step-2 checkpoint
    shutil.rmtree(from_latents / "model")
    pretrain("ldm", config(tmp_path / "latents", latent_set["out"]), resume="auto")
    assert _records(from_latents) == ours  # bit-identical losses after the resume
    resumed = load_file(from_latents / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert resumed.keys() == weights.keys() and all(torch.equal(resumed[k], weights[k]) for k in weights)


def test_the_ldm_refuses_latents_of_another_vae_or_with_augmentation(latent_set, tiny_shards, tiny_config,
                                                                      tmp_path) -> None:
    from brainfm.config import ConfigError

    other = _vae(tmp_path, 3)  # the same weights with another scaling factor: another VAE for the diffusion model
    (other / "config.json").write_text((other / "config.json").read_text().replace("0.8", "0.9"))
    config = tiny_config("3d", tiny_shards, tmp_path)
    config.ldm = dataclasses.replace(config.ldm, latent_dir=str(latent_set["out"]), vae_path=str(other))
    with pytest.raises(BrainFMInputError, match="another VAE"):
        pretrain("ldm", config)
    config.ldm = dataclasses.replace(config.ldm, vae_path=str(latent_set["vae"]))
    config.data = dataclasses.replace(config.data, augment=True)
    with pytest.raises(ConfigError, match="augment"):
        pretrain("ldm", config)
