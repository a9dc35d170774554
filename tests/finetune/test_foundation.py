"""Fine-tuning never writes to the foundation model: head-only training leaves the VAE, the latent UNet and the
conditioner bit-identical; with LoRA only the adapters move, and they save and load with the head."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from brainfm.finetune.evaluate import load_head_predictor, record_probability
from brainfm.finetune.features import hide_label
from brainfm.finetune.task import HeadTask, build_samples, foundation_features, make_head
from brainfm.train.trainer import Trainer


def _digest(state: dict[str, torch.Tensor]) -> str:
    sha = hashlib.sha256()
    for key in sorted(state):
        sha.update(key.encode())
        sha.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


def _samples(feature_set):
    lesion = next(r for r in feature_set.records if r.has_lesion)
    healthy = next(r for r in feature_set.records if not r.has_lesion)
    common = dict(z_threshold=feature_set.z_threshold, low_z=0.5, with_anatomy=True)
    return (build_samples([lesion], 2, negatives_per_positive=0.5, **common),
            build_samples([hide_label(healthy)], 2, **common), lesion)


def _train(config, model_dir, feature_set, run_dir, lora: bool):
    extractor, peft_model = foundation_features(model_dir, config, trainable_lora=lora)
    foundation = {"vae": extractor.vae, "unet": extractor.unet, "conditioner": extractor.conditioner}
    before = {name: {k: v.clone() for k, v in net.state_dict().items()} for name, net in foundation.items()}
    head = make_head(config, 2, (), feature_channels=extractor.channels)
    head_before = _digest(head.state_dict())
    labelled, unlabelled, lesion = _samples(feature_set)
    task = HeadTask(config, labelled, unlabelled, head, extractor, peft_model,
                    {"model": str(model_dir), "feature_timestep": extractor.timestep})
    Trainer(config, run_dir).fit(task)
    return foundation, before, head, head_before, lesion, task


def test_head_only_finetuning_keeps_the_foundation_bit_identical(feature_set, model_dir, finetune_config, tmp_path):
    config = finetune_config(tmp_path, head={"unet_features": True}, optim={"max_steps": 3})
    foundation, before, head, head_before, _, _ = _train(config, model_dir, feature_set, tmp_path / "run", lora=False)
    for name, net in foundation.items():
        assert _digest(net.state_dict()) == _digest(before[name]), name
        assert not any(p.requires_grad for p in net.parameters()), name
    assert _digest(head.state_dict()) != head_before  # the head did train
    assert not (tmp_path / "run" / "lora").exists()


def test_lora_finetuning_moves_only_adapters_which_reload_with_the_head(feature_set, model_dir, finetune_config,
                                                                      tmp_path):
    config = finetune_config(tmp_path, head={"unet_features": True}, lora={"enabled": True, "rank": 2},
                                  optim={"max_steps": 3, "lr": 1.0e-2})
    foundation, before, _, _, lesion, task = _train(config, model_dir, feature_set, tmp_path / "run", lora=True)
    unet_state = foundation["unet"].state_dict()
    adapters = {k for k in unet_state if "lora_" in k}
    assert adapters
    base_keys = {k: k.replace(".base_layer", "") for k in unet_state if k not in adapters}
    assert all(torch.equal(unet_state[k], before["unet"][k]) for k in base_keys if k in before["unet"])
    assert any(not torch.equal(unet_state[k], before["unet"][k]) for k in adapters if "lora_B" in k)
    for name in ("vae", "conditioner"):
        assert _digest(foundation[name].state_dict()) == _digest(before[name])
    assert (tmp_path / "run" / "lora" / "adapter_model.safetensors").is_file()

    predictor = load_head_predictor(tmp_path / "run", model_dir)
    assert predictor.features is not None
    loaded = predictor.features.unet.state_dict()
    assert all(torch.equal(loaded[k], unet_state[k]) for k in adapters)
    task.model.eval()
    z = int(np.argmax(lesion.label.sum(axis=(0, 1))))
    probability = record_probability(predictor, lesion)[..., z]
    with torch.no_grad():
        batch = {"scan": torch.from_numpy(lesion.image[None, None, ..., z]),
                 "pseudo_healthy": torch.from_numpy(lesion.pseudo_healthy[None, None, ..., z]),
                 "zmap": torch.from_numpy(lesion.zmap[None, None, ..., z]),
                 "anatomy": torch.from_numpy(lesion.anatomy[None, ..., z]), "meta": [lesion.meta],
                 "slice_position": torch.tensor([z / (lesion.image.shape[-1] - 1)])}
        expected = torch.sigmoid(task.model.logits(batch))[0, 0].numpy() * lesion.mask[..., z]
    np.testing.assert_allclose(probability, expected, atol=1e-5)
