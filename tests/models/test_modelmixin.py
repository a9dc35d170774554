"""The contract every brainfm network (a diffusers ``ModelMixin`` + ``ConfigMixin``) keeps, checked by one tester
mixin: save_pretrained / from_pretrained round trip bit for bit (safetensors only), config round trip, and
deterministic construction and forward passes on CPU. Each network adds a subclass with a tiny config and inputs
cut from the real ICBM152 template."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from brainfm.models import BrainDiscriminator, BrainVAE, Conditioner, LatentUNet
from brainfm.models.heads import LesionHead

META = [{"modality": "T1", "sex": "F", "age": 34.0, "scalars": {"brain_volume_ml": 1210.0}},
        {"modality": "FLAIR", "sex": "M", "site": "siteB", "age": 71.0}]


def _non_zero(model: nn.Module) -> nn.Module:
    """MONAI zero-initialises output convolutions and attention projections: give them weights, so outputs (and
    the comparisons below) depend on every parameter."""
    with torch.no_grad():
        for index, param in enumerate(model.parameters()):
            if param.ndim > 1 and not param.any():
                param.normal_(std=0.05, generator=torch.Generator().manual_seed(index))
    return model


def _as_tuple(output: Any) -> tuple[torch.Tensor, ...]:
    return tuple(output) if isinstance(output, tuple | list) else (output,)


class ModelTesterMixin:
    """Subclasses set ``model_class`` and implement ``make`` (a tiny model, seeded) and ``run`` (a forward pass
    on fixed inputs)."""

    model_class: type

    def make(self) -> nn.Module:
        raise NotImplementedError

    def run(self, model: nn.Module, brain_2d: dict[str, torch.Tensor]) -> Any:
        raise NotImplementedError

    def _seeded(self) -> nn.Module:
        torch.manual_seed(1234)
        return self.make().eval()

    def test_save_load_round_trip_is_bitwise(self, brain_2d, tmp_path):
        model = self._seeded()
        model.save_pretrained(tmp_path, safe_serialization=True)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
        loaded = self.model_class.from_pretrained(tmp_path).eval()
        assert type(loaded) is self.model_class
        original, reloaded = model.state_dict(), loaded.state_dict()
        assert list(original) == list(reloaded) and original
        for key, tensor in original.items():
            assert tensor.dtype == reloaded[key].dtype and torch.equal(tensor, reloaded[key]), key
        with torch.no_grad():
            for a, b in zip(_as_tuple(self.run(model, brain_2d)), _as_tuple(self.run(loaded, brain_2d)), strict=True):
                assert torch.equal(a, b)

    def test_config_round_trip(self, tmp_path):
        model = self._seeded()
        config = {k: v for k, v in model.config.items() if not k.startswith("_")}
        rebuilt = self.model_class.from_config(model.config)
        assert {k: v for k, v in rebuilt.config.items() if not k.startswith("_")} == config
        assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == {
            k: tuple(v.shape) for k, v in model.state_dict().items()}
        model.save_config(tmp_path)
        stored = json.loads((tmp_path / "config.json").read_text())
        assert stored["_class_name"] == self.model_class.__name__
        assert {k: v for k, v in self.model_class.load_config(tmp_path).items() if not k.startswith("_")} == \
            json.loads(json.dumps(config))  # what JSON keeps of the config is what comes back

    def test_deterministic_on_cpu(self, brain_2d):
        first, second = self._seeded(), self._seeded()
        assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(),
                                                     strict=True))
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            with torch.no_grad():
                outputs = [_as_tuple(self.run(first, brain_2d)), _as_tuple(self.run(first, brain_2d)),
                           _as_tuple(self.run(second, brain_2d))]
        finally:
            torch.use_deterministic_algorithms(previous)
        for a, b, c in zip(*outputs, strict=True):
            assert torch.isfinite(a).all() and torch.equal(a, b) and torch.equal(a, c)


class TestBrainVAE(ModelTesterMixin):
    model_class = BrainVAE

    def make(self) -> nn.Module:
        return BrainVAE(spatial_dims=2, channels=(8, 16), latent_channels=4, norm_num_groups=8, scaling_factor=0.7)

    def run(self, model: nn.Module, brain_2d: dict[str, torch.Tensor]) -> Any:
        mu, sigma = model.encode(brain_2d["image"])  # (the full forward samples the posterior)
        return mu, sigma, model.decode(mu), model.encode_latent(brain_2d["image"])


class TestBrainDiscriminator(ModelTesterMixin):
    model_class = BrainDiscriminator

    def make(self) -> nn.Module:
        return BrainDiscriminator(spatial_dims=2, channels=8, num_layers_d=2)

    def run(self, model: nn.Module, brain_2d: dict[str, torch.Tensor]) -> Any:
        return model(brain_2d["image"])


class TestLatentUNet(ModelTesterMixin):
    model_class = LatentUNet

    def make(self) -> nn.Module:
        return _non_zero(LatentUNet(spatial_dims=2, channels=(16, 32), attention_levels=(False, True),
                                    num_head_channels=16, cross_attention_dim=16, norm_num_groups=8))

    def run(self, model: nn.Module, brain_2d: dict[str, torch.Tensor]) -> Any:
        z_t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
        context = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(4))
        return model(z_t, torch.tensor([10, 700]), brain_2d["anatomy"], context)


class TestConditioner(ModelTesterMixin):
    model_class = Conditioner

    def make(self) -> nn.Module:
        return Conditioner(sites=("siteA", "siteB"), hidden_size=16, num_heads=2, cross_attention_dim=16,
                           scalar_norms={"age": {"mean": 40.0, "std": 10.0}})

    def run(self, model: nn.Module, brain_2d: dict[str, torch.Tensor]) -> Any:
        return model(model.tokenize(META)), model.null_context(2)


class TestLesionHead(ModelTesterMixin):
    model_class = LesionHead

    def make(self) -> nn.Module:
        return LesionHead(spatial_dims=2, channels=(4, 8), feature_channels=2, diseases=("ms",),
                          disease_mode="film")

    def run(self, model: nn.Module, brain_2d: dict[str, torch.Tensor]) -> Any:
        image = brain_2d["image"]
        x = model.assemble(image, image * 0.9, image * 5.0, brain_2d["anatomy"][:, :2])
        return model(x, model.disease_index(["ms", None]))


def test_every_brainfm_network_has_a_tester():
    """A new ModelMixin in brainfm.models must get its tester subclass here."""
    from diffusers import ModelMixin

    import brainfm.models as models
    import brainfm.models.heads as heads

    networks = {cls for module in (models, heads) for cls in vars(module).values()
                if isinstance(cls, type) and issubclass(cls, ModelMixin) and cls.__module__.startswith("brainfm")}
    tested: set[Callable] = {cls.model_class for cls in ModelTesterMixin.__subclasses__()}
    assert networks == tested == {BrainVAE, BrainDiscriminator, LatentUNet, Conditioner, LesionHead}


@pytest.fixture(autouse=True)
def _fresh_seed():
    torch.manual_seed(0)
