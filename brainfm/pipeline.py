"""``BrainFMPipeline``: a release folder (local or on the Hub) as one diffusers pipeline object.

It registers the four components like any diffusers pipeline (so ``save_pretrained``, ``.to()``, offload and
``components`` behave as users expect) but loads them itself through :mod:`brainfm.hub`: configs and
safetensors only, classes from an allow-list of installed brainfm/diffusers classes, never ``trust_remote_code``
and never any Python file from the folder. Calling it runs the anomaly module's deviation mapping on one scan.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from brainfm.io import BrainFMInputError


@dataclasses.dataclass
class BrainFMPipelineOutput(BaseOutput):
    """Deviation mapping of one scan, on the model's preprocessed grid (``affine`` maps it to world space)."""

    pseudo_healthy: np.ndarray
    z_map: np.ndarray
    mask: np.ndarray
    score: float
    threshold: float
    affine: np.ndarray
    image: np.ndarray  # the preprocessed input the maps refer to
    uncertainty: np.ndarray  # spread of the reconstruction ensemble


class BrainFMPipeline(DiffusionPipeline):
    """Pseudo-healthy reconstruction and deviation maps for brain MRI/CT from a brainfm release."""

    model_cpu_offload_seq = "conditioner->unet->vae"

    def __init__(self, vae: Any, unet: Any, conditioner: Any, scheduler: Any) -> None:
        super().__init__()
        self.register_modules(vae=vae, unet=unet, conditioner=conditioner, scheduler=scheduler)
        self.model_dir: Path | None = None
        self.brainfm_config: dict[str, Any] = {}
        self.heads: dict[str, Any] = {}

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, revision: str | None = None, **kwargs: Any
    ) -> BrainFMPipeline:
        """Load a release or model folder, or a Hub repo id (``HF_HUB_OFFLINE=1`` is honoured).

        diffusers' own loader is bypassed on purpose: it can import a ``<library>.py`` placed beside a
        component. Options that would run foreign code are refused rather than silently ignored.
        """
        if kwargs.pop("trust_remote_code", False) or kwargs.pop("custom_pipeline", None) is not None:
            raise BrainFMInputError(
                str(pretrained_model_name_or_path), "brainfm never runs code from a model repo (trust_remote_code)"
            )
        if kwargs.pop("use_safetensors", True) is False:
            raise BrainFMInputError(str(pretrained_model_name_or_path), "brainfm loads safetensors weights only")
        torch_dtype = kwargs.pop("torch_dtype", None)
        device = kwargs.pop("device", None)
        kwargs.pop("local_files_only", None)  # HF_HUB_OFFLINE decides; a local folder never touches the network
        if kwargs:
            raise TypeError(f"BrainFMPipeline.from_pretrained got unsupported options {sorted(kwargs)}")
        from brainfm import hub
        from brainfm.anomaly.pipeline import load_model_dir

        folder = hub.resolve_model_path(pretrained_model_name_or_path, revision=revision)
        model = load_model_dir(folder, device=device or "cpu")
        pipe = cls(vae=model.vae, unet=model.unet, conditioner=model.encoder, scheduler=model.scheduler)
        pipe.model_dir = folder
        pipe.brainfm_config = dict(model.config)
        pipe.heads = hub.load_heads(folder)
        pipe._model = model
        if torch_dtype is not None:
            pipe.to(dtype=torch_dtype)
        return pipe

    @property
    def modalities(self) -> tuple[str, ...]:
        return self._anomaly_model().modalities

    def _anomaly_model(self) -> Any:
        """The anomaly module's model record, pointing at THIS pipeline's (possibly moved or swapped) modules."""
        model = getattr(self, "_model", None)
        if model is None:
            raise BrainFMInputError(None, "BrainFMPipeline has no recipe or calibration: load it with from_pretrained")
        return dataclasses.replace(model, vae=self.vae, unet=self.unet, encoder=self.conditioner,
                                   scheduler=self.scheduler)

    def __call__(
        self,
        image: str | os.PathLike | np.ndarray,
        modality: str | None = None,
        affine: np.ndarray | None = None,
        **detect_kwargs: Any,
    ) -> BrainFMPipelineOutput:
        """Deviation-map one scan: a NIfTI/DICOM path, or a 3D array with its 4x4 voxel-to-world ``affine``.

        Preprocessing, reconstruction settings and calibration come from the loaded folder, exactly as
        ``brainfm detect`` would use them. Options: ``mask`` (brain-mask path), ``meta`` (age, sex, site),
        ``vae_only`` (the VAE-reconstruction baseline). Maps are on the model grid; ``affine`` in the output
        maps them to world space.
        """
        if isinstance(image, str | os.PathLike):
            return self._detect(Path(image), modality, detect_kwargs)
        array = np.asarray(image)
        if array.ndim != 3:
            raise BrainFMInputError("<array>", f"expected a 3D volume, got shape {array.shape}")
        if affine is None or np.asarray(affine).shape != (4, 4):
            raise BrainFMInputError("<array>", "an array input needs its 4x4 voxel-to-world affine (affine=...)")
        if not np.isfinite(array).all():
            raise BrainFMInputError("<array>", "volume contains NaN or infinite values")
        from brainfm.io import save_nifti

        with tempfile.TemporaryDirectory(prefix="brainfm-pipeline-") as tmp:
            path = Path(tmp) / "input.nii.gz"
            save_nifti(array.astype(np.float32), np.asarray(affine, dtype=np.float64), path)
            return self._detect(path, modality, detect_kwargs)

    def _detect(self, path: Path, modality: str | None, options: dict[str, Any]) -> BrainFMPipelineOutput:
        from brainfm.anomaly.pipeline import analyse, prepare_scan

        mask_path = options.pop("mask", None)
        meta = options.pop("meta", None)
        vae_only = bool(options.pop("vae_only", False))
        if options:
            raise TypeError(f"unsupported options {sorted(options)}; expected mask, meta, vae_only")
        model = self._anomaly_model()
        prepared = prepare_scan(model, path, modality, mask_path, meta=meta)
        analysis = analyse(model, prepared.scan.image, prepared.scan.mask, prepared.anatomy, prepared.meta,
                           vae_only=vae_only, source=str(path))
        return BrainFMPipelineOutput(
            pseudo_healthy=analysis.reconstruction, z_map=analysis.zmap, mask=analysis.mask,
            score=analysis.subject_score, threshold=analysis.threshold, affine=np.asarray(prepared.scan.affine),
            image=prepared.scan.image, uncertainty=analysis.uncertainty,
        )
