"""The pretraining tasks end to end on template-derived shards (loss goes down, exports load), and every task —
VAE, LDM and the fine-tuning head — declares exactly the hooks of the ``Task`` protocol."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from brainfm.finetune.task import HeadTask
from brainfm.train.pretrain import pretrain
from brainfm.train.tasks import Task
from brainfm.train.tasks.ldm import LDMTask
from brainfm.train.tasks.vae import VAETask


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / "losses.jsonl").read_text().splitlines()]


HOOKS = [name for name, value in vars(Task).items() if inspect.isfunction(value) and not name.startswith("_")]


def test_the_protocol_declares_every_hook_the_trainer_calls() -> None:
    assert sorted(HOOKS) == ["enable_gradient_checkpointing", "export", "extra_state", "losses", "make_stream",
                             "preview"]
    assert set(Task.__annotations__) == {"name", "objectives"}


@pytest.mark.parametrize("task_class", [VAETask, LDMTask, HeadTask], ids=["vae", "ldm", "head"])
def test_every_task_implements_the_protocol_with_its_signatures(task_class: type) -> None:
    assert isinstance(task_class.name, str) and task_class.name
    for hook in HOOKS:
        declared = inspect.signature(getattr(Task, hook))
        implemented = inspect.signature(getattr(task_class, hook))
        assert [(p.name, p.kind, p.annotation) for p in implemented.parameters.values()] == \
               [(p.name, p.kind, p.annotation) for p in declared.parameters.values()], (task_class, hook)
        if hook != "make_stream":  # a task returns its own Stream class
            assert implemented.return_annotation == declared.return_annotation, (task_class, hook)


@pytest.fixture(scope="module")
def vae_run_2d(tiny_shards: Path, tiny_config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vae2d")
    return pretrain("vae", tiny_config("2d", tiny_shards, out))


def test_vae_2d_reduces_loss_and_exports(vae_run_2d: Path) -> None:
    from brainfm.models.vae import BrainVAE

    records = _records(vae_run_2d)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    recon = [r["parts"]["recon"] for r in records]
    assert np.mean(recon[-2:]) < 0.8 * np.mean(recon[:2]), recon
    assert "discriminator" not in records[1]["losses"] and "discriminator" in records[2]["losses"]  # warm-up 2
    vae = BrainVAE.from_pretrained(str(vae_run_2d / "vae"))
    factor = vae.config.scaling_factor
    assert np.isfinite(factor) and factor > 0 and factor != 1.0
    # the stored factor makes training latents unit-variance (it was computed from them)
    from brainfm.data.reader import make_dataloader

    batch = next(iter(make_dataloader(_shard_dir(vae_run_2d), "train", mode="2d", batch_size=16)))
    z = vae.encode_latent(batch["image"])
    assert 0.5 < float(z.std()) < 2.0
    steps = sorted(p.name for p in (vae_run_2d / "checkpoints").iterdir())
    assert steps == ["step-4", "step-6"]  # keep_checkpoints: 2
    assert (vae_run_2d / "samples" / "step-0000003.png").stat().st_size > 0
    assert list((vae_run_2d / "logs").rglob("events.out.tfevents.*"))
    recipe = json.loads((vae_run_2d / "data_recipe.json").read_text())
    assert recipe["recipe"] and recipe["mode"] == "2d"


def _shard_dir(run_dir: Path) -> str:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["shard_dir"]


def test_ldm_2d_trains_on_the_vae_export(vae_run_2d: Path, tiny_shards: Path, tiny_config) -> None:
    from brainfm.data.preprocess import recipe_from_dict
    from brainfm.models.vae import BrainVAE
    from brainfm.pipeline import BrainFMPipeline

    out = vae_run_2d.parent
    config = tiny_config("2d", tiny_shards, out, optim={"max_steps": 8}, train={"checkpoint_every": 8})
    run_dir = pretrain("ldm", config)
    losses = [r["losses"]["denoiser"] for r in _records(run_dir)]
    assert len(losses) == 8 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    # RUN/model: the complete, uncalibrated model folder `brainfm calibrate --run` starts from, its one export
    assert not any((run_dir / name).exists() for name in ("unet", "conditioner", "scheduler"))
    pipeline = BrainFMPipeline.from_pretrained(run_dir / "model")
    unet, conditioner = pipeline.unet, pipeline.conditioner
    assert unet.config.anatomy_channels == 3  # brain mask + GM + WM priors
    assert unet.config.latent_channels == 2
    assert pipeline.noise_scheduler.config.num_train_timesteps == 100
    context = conditioner(conditioner.tokenize([{"modality": "T1", "age": 50.0}], torch.tensor([0.5])))
    prediction = unet(torch.zeros(1, 2, 20, 24), 10, torch.zeros(1, 3, 40, 48), context)
    assert prediction.shape == (1, 2, 20, 24) and torch.isfinite(prediction).all()
    index = json.loads((tiny_shards / "index.json").read_text())
    assert pipeline.recipe == recipe_from_dict(index["recipe"], "index.json") and pipeline.modalities == ("T1",)
    assert pipeline.calibration is None and pipeline.config.provenance["source_run"] == str(out.resolve())
    # both stages' compute records travel with the model folder (into its card); sessions as a count
    compute = pipeline.config.provenance["training_compute"]
    assert set(compute) == {"vae", "ldm"} and compute["ldm"]["steps"] == 8 and compute["ldm"]["sessions"] == 1
    assert compute["ldm"]["task"] == "pretrain-ldm" and compute["ldm"]["hardware"]["processes"] == 1
    # the frozen VAE of the VAE stage, and the denoiser's EMA weights (not the live ones) of the last step
    vae = BrainVAE.from_pretrained(str(vae_run_2d / "vae"))
    assert pipeline.vae.config.scaling_factor == vae.config.scaling_factor
    assert all(torch.equal(v, pipeline.vae.state_dict()[k]) for k, v in vae.state_dict().items())
    exported = [*unet.parameters(), *conditioner.parameters()]
    states = [torch.load(f, weights_only=False) for f in sorted((run_dir / "checkpoints" / "step-8").glob("custom_*"))]
    ema = next(state for state in states if isinstance(state, dict) and "shadow_params" in state)
    assert len(ema["shadow_params"]) == len(exported)
    assert all(torch.equal(e, s) for e, s in zip(exported, ema["shadow_params"], strict=True))
    from safetensors.torch import load_file

    live = load_file(run_dir / "checkpoints" / "step-8" / "model.safetensors")
    assert any(not torch.equal(live[f"unet.{k}"], v) for k, v in unet.state_dict().items())


def test_every_trainable_parameter_of_the_pretraining_tasks_gets_a_gradient(vae_run_2d: Path, tiny_shards: Path,
                                                                             tiny_config) -> None:
    """DDP waits for a gradient of every trainable parameter: one that is never in the graph fails a multi-process
    run at its second step (the conditioner's unused BERT word table did)."""
    from accelerate import Accelerator

    from brainfm.train.stream import probe_batch

    config = tiny_config("2d", tiny_shards, vae_run_2d.parent)
    probe = probe_batch(config)
    accelerator = Accelerator(cpu=True)
    tasks = [VAETask(config, probe), LDMTask(config, probe, vae_run_2d / "vae", seed=0)]
    for task in tasks:
        batch = task.make_stream(accelerator).next()
        losses, _ = task.losses(accelerator, batch, step=config.vae.adv_warmup_steps + 1)  # discriminator on
        assert set(losses) == {o.name for o in task.objectives}, task.name
        sum(losses.values()).backward()
        for objective in task.objectives:
            missing = [n for n, p in objective.model.named_parameters() if p.requires_grad and p.grad is None]
            assert not missing, (task.name, objective.name, missing)
