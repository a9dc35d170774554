"""Pseudo-healthy reconstructions kept on disk for a later evaluation of the same scans by the same network.

A scan's reconstruction and residual depend on the networks' weights, the reconstruction settings and the scan,
never on the calibration. A site adaptation without LoRA steps changes the calibration only, so evaluating the
adapted model on the test scans the foundation model was just evaluated on would run the diffusion model again
to get the same arrays; :class:`ReconstructionStore` lets the second evaluation read them instead (the demo's
adaptation stage does). Entries are keyed by a fingerprint of everything the reconstruction depends on and checked
against the scan's content, so a changed network, setting or scan is recomputed, never silently reused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from brainfm.data.manifest import sanitize_key
from brainfm.io import atomic_path

STORE_FORMAT = "brainfm-reconstructions/1"


def reconstruction_fingerprint(pipeline: Any, settings: dict[str, Any], vae_only: bool, residual: str) -> str:
    """sha256 (16 hex digits) over the reconstructor's ``settings``, the residual kind and every weight the
    reconstruction runs through (the VAE; for the LDM also the UNet, site adapters merged, and the conditioner)."""
    digest = hashlib.sha256(STORE_FORMAT.encode())
    digest.update(json.dumps({"settings": settings, "residual": residual, "vae_only": vae_only},
                             sort_keys=True, default=str).encode())
    modules = [pipeline.vae] if vae_only else [pipeline.vae, pipeline.unet, pipeline.conditioner]
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            value = tensor.detach().cpu()
            digest.update((value.float() if value.is_floating_point() else value).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def scan_digest(image: np.ndarray, mask: np.ndarray, anatomy: np.ndarray, meta: dict[str, Any]) -> str:
    """sha256 of what the reconstruction reads of a scan: image, brain mask, anatomy maps and metadata."""
    digest = hashlib.sha256()
    for array in (image, mask, anatomy):
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    digest.update(json.dumps(meta, sort_keys=True, default=str).encode())
    return digest.hexdigest()


class ReconstructionStore:
    """``folder/<fingerprint>/<scan>.npz``: one scan's residual and reconstruction (float32, exact; compressed,
    the background is zeros), with the digest of the scan they were made from."""

    def __init__(self, folder: str | Path, fingerprint: str) -> None:
        self.folder = Path(folder) / fingerprint
        self.reused = 0

    def _path(self, name: str) -> Path:
        return self.folder / f"{sanitize_key(name)}.npz"

    def load(self, name: str, digest: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The stored (residual, reconstruction) of scan ``name``, or None when absent, unreadable or made from
        other content under the same name."""
        path = self._path(name)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as stored:
                if str(stored["scan_sha256"]) != digest:
                    return None
                residual, reconstruction = stored["residual"], stored["reconstruction"]
        except (OSError, ValueError, KeyError):
            return None  # a damaged entry is recomputed (and replaced), never trusted
        self.reused += 1
        return residual, reconstruction

    def save(self, name: str, digest: str, residual: np.ndarray, reconstruction: np.ndarray) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self._path(name)) as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(fh, residual=np.asarray(residual, np.float32),
                                reconstruction=np.asarray(reconstruction, np.float32), scan_sha256=np.asarray(digest))


__all__ = ["ReconstructionStore", "reconstruction_fingerprint", "scan_digest"]
