"""The networks a config section describes, by their constructors: each section's schema is derived from the
constructor's signature (:class:`~brainfm.config.loader.NetworkArgs`), so a config never repeats a network's
arguments; the arguments derived from the data are filled by the trainer and are not configurable."""

from __future__ import annotations

from typing import Any

from brainfm.config.loader import NetworkArgs


def _network(name: str) -> type:
    """The network class ``name``, imported on first use (the networks pull in torch)."""
    from brainfm.models.conditioning import Conditioner
    from brainfm.models.heads import LesionHead
    from brainfm.models.unet import LatentUNet
    from brainfm.models.vae import BrainDiscriminator, BrainVAE

    networks = (BrainVAE, BrainDiscriminator, LatentUNet, Conditioner, LesionHead)
    return {network.__name__: network for network in networks}[name]


VAE_NETWORK = NetworkArgs(
    "BrainVAE", _network, ("spatial_dims", "in_channels", "out_channels", "scaling_factor"), __name__
)
DISCRIMINATOR_NETWORK = NetworkArgs("BrainDiscriminator", _network, ("spatial_dims", "in_channels"), __name__)
UNET_NETWORK = NetworkArgs(
    "LatentUNet",
    _network,
    ("spatial_dims", "latent_channels", "anatomy_channels", "prediction_type"),
    __name__,
)
CONDITIONER_NETWORK = NetworkArgs("Conditioner", _network, (), __name__)
HEAD_NETWORK = NetworkArgs("LesionHead", _network, ("spatial_dims", "feature_channels", "diseases"), __name__)
_NETWORKS = {
    f"{n.name}Args": n
    for n in (VAE_NETWORK, DISCRIMINATOR_NETWORK, UNET_NETWORK, CONDITIONER_NETWORK, HEAD_NETWORK)
}


def __getattr__(name: str) -> Any:
    """The generated argument models (``BrainVAEArgs``, ...) by name, so pickle can find them."""
    if name in _NETWORKS:
        return _NETWORKS[name].model()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
