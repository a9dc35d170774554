"""A fine-tuned head at inference: lesion probability maps and its healthy-calibrated binary mask.

The head sees what the unsupervised pipeline already computed for a scan (scan, pseudo-healthy reconstruction,
z-map) and, when it was trained on them, features of the frozen latent UNet (with its LoRA adapters). Its
threshold was set exactly like the z threshold (a quantile over the eroded brain of healthy scans), and its
probability map is binarised with the same post-processing, so both maps are read the same way.

A head travels as a pipeline component (``head/``) with its settings (``head_settings`` in the pipeline config,
the content of the training run's ``head_config.json``) and its LoRA adapters (``head_lora/``).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainfm.anomaly.deviation import binarize
from brainfm.config import DeviationConfig, from_dict, to_dict
from brainfm.io import BrainFMInputError
from brainfm.models.heads import LesionHead, UNetFeatures

HEAD_CONFIG = "head_config.json"  # a head training run's settings (threshold, inputs, feature timestep, lora)
HEAD_SUBDIR = "head"  # the head weights inside a training run folder
LORA_SUBDIR = "lora"  # the UNet's LoRA adapters inside a training run folder
LORA_CONFIG = "adapter_config.json"
LORA_WEIGHTS = "adapter_model.safetensors"


class HeadPredictor:
    """A trained head (+ frozen UNet features and LoRA when it uses them) that maps one scan to probabilities."""

    def __init__(self, head: LesionHead, features: UNetFeatures | None = None, *, threshold: float | None = None,
                 deviation: DeviationConfig | None = None, info: Mapping[str, Any] | None = None,
                 batch_size: int = 16, path: Path | None = None) -> None:
        self.head = head.eval()
        self.features = None if features is None else features.eval()
        self.threshold = threshold
        self.deviation = deviation or DeviationConfig()
        self.info = dict(info or {})
        self.batch_size = batch_size
        self.path = path

    @classmethod
    def from_pipeline(cls, pipeline: Any) -> HeadPredictor:
        """The head of a loaded ``BrainFMPipeline``. UNet features come from a COPY of the pipeline's UNet (with
        the head's LoRA adapters attached), so the pipeline's own reconstruction is never altered."""
        head = pipeline.head
        if head is None:
            raise BrainFMInputError(pipeline.model_dir, "this model has no fine-tuned head")
        info = dict(pipeline.config.head_settings or {})
        features = None
        if head.config.feature_channels:
            if info.get("feature_timestep") is None:
                raise BrainFMInputError(pipeline.model_dir, "the head uses UNet features but its settings hold no "
                                                            "feature_timestep")
            unet = copy.deepcopy(pipeline.unet).requires_grad_(False)
            if info.get("lora"):
                lora = pipeline.head_lora
                if lora is None:
                    raise BrainFMInputError(pipeline.model_dir, "the head was trained with LoRA adapters, which "
                                                                "are missing")
                unet = attach_lora(unet, lora)
            features = UNetFeatures(pipeline.vae, unet, pipeline.conditioner, int(info["feature_timestep"]))
        deviation = from_dict(DeviationConfig, info["deviation"]) if "deviation" in info else None
        return cls(head, features, threshold=info.get("threshold"), deviation=deviation, info=info,
                   path=pipeline.head_source)

    @torch.no_grad()
    def probability(self, image: np.ndarray, pseudo_healthy: np.ndarray, zmap: np.ndarray, mask: np.ndarray,
                    anatomy: np.ndarray | None = None, meta: Mapping[str, Any] | None = None,
                    disease: str | None = None) -> np.ndarray:
        """Lesion probability on the model grid (X, Y, Z), 0 outside the brain. ``disease``: read that disease's
        channel/token when the head was trained on it, the "any lesion" output otherwise."""
        head = self.head
        brain = np.asarray(mask) > 0
        stack = np.stack([image, pseudo_healthy, zmap]).astype(np.float32)[:, None]  # (3, 1, X, Y, Z)
        channel = head.output_channel(disease)
        token = head.disease_index([disease]) if head.config.disease_mode == "film" else None
        out = np.zeros(brain.shape, dtype=np.float32)
        if head.config.spatial_dims == 3:
            slab = None if anatomy is None else np.asarray(anatomy)[None]
            out = self._predict(stack[:, None], slab, meta, None, token, channel)[0]
        else:
            depth = brain.shape[-1]
            slices = [z for z in range(depth) if brain[..., z].any()]
            for start in range(0, len(slices), self.batch_size):
                chunk = slices[start:start + self.batch_size]
                maps = np.stack([stack[..., z] for z in chunk], axis=1)  # (3, n, 1, X, Y)
                slab = None if anatomy is None else np.stack([anatomy[..., z] for z in chunk])
                positions = torch.tensor([z / max(1, depth - 1) for z in chunk], dtype=torch.float32)
                probs = self._predict(maps, slab, meta, positions, token, channel)
                for i, z in enumerate(chunk):
                    out[..., z] = probs[i]
        return np.where(brain, out, 0.0).astype(np.float32)

    def _predict(self, maps: np.ndarray, anatomy: np.ndarray | None, meta: Mapping[str, Any] | None,
                 positions: torch.Tensor | None, token: torch.Tensor | None, channel: int) -> np.ndarray:
        """``maps`` (3, B, 1, *spatial), ``anatomy`` (B, C, *spatial) → (B, *spatial) probabilities."""
        device = self.head.device
        tensors = torch.from_numpy(np.ascontiguousarray(maps)).to(device)
        scan, pseudo, zmap = tensors[0], tensors[1], tensors[2]
        batch = scan.shape[0]
        features = None
        if self.features is not None:
            if anatomy is None:
                raise ValueError("this head uses UNet features: pass the scan's anatomy maps")
            slab = torch.from_numpy(np.ascontiguousarray(anatomy, dtype=np.float32)).to(device)
            features = self.features(scan, slab, [dict(meta or {})] * batch, positions)
        x = self.head.assemble(scan, pseudo, zmap, features)
        tokens = None if token is None else token.expand(batch)
        logits = self.head(x, tokens)[:, channel]
        return torch.sigmoid(logits).float().cpu().numpy()

    def predict(self, image: np.ndarray, pseudo_healthy: np.ndarray, zmap: np.ndarray, mask: np.ndarray,
                anatomy: np.ndarray | None = None, meta: Mapping[str, Any] | None = None,
                disease: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(probability map, binary mask at the calibrated threshold or None if uncalibrated) on the model grid,
        binarised with the same post-processing as the z-map. The probability is zero outside the brain: the head
        sees padding there, and a map that overlays the scan must not light up the background."""
        brain = np.asarray(mask) > 0
        probability = self.probability(image, pseudo_healthy, zmap, mask, anatomy, meta, disease) * brain
        if self.threshold is None:
            return probability, None
        return probability, binarize(probability, self.threshold, brain, self.deviation)

    def protocol(self) -> dict[str, Any]:
        """What a report must state about the head: where it is, its inputs and its calibrated threshold."""
        return {"head": str(self.path), "threshold": self.threshold, "target_fpr": self.info.get("target_fpr"),
                "threshold_calibration": "quantile of head probability over the eroded brain of healthy scans",
                "inputs": list(self.head.config.inputs), "diseases": list(self.head.config.diseases),
                "unet_features": self.features is not None, "lora": bool(self.info.get("lora")),
                **{k: v for k, v in to_dict(self.deviation).items() if k in ("mask_erosion_vox", "min_component_vox")}}


def read_lora(directory: Path) -> dict[str, Any]:
    """LoRA adapters as ``{"config": adapter_config dict, "weights": {name: tensor}}``, safetensors only."""
    import json

    from safetensors.torch import load_file

    config_path, weights_path = directory / LORA_CONFIG, directory / LORA_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise BrainFMInputError(directory, f"no LoRA adapter here ({LORA_CONFIG} + {LORA_WEIGHTS})")
    try:
        config = json.loads(config_path.read_bytes())
        weights = load_file(str(weights_path))
    except Exception as exc:  # JSON or safetensors errors: one line naming the folder
        raise BrainFMInputError(directory, f"unreadable LoRA adapter ({type(exc).__name__}: {exc})") from exc
    if not isinstance(config, dict) or str(config.get("peft_type", "")).upper() != "LORA":
        raise BrainFMInputError(config_path, "not a LoRA adapter config (peft_type must be LORA)")
    return {"config": config, "weights": weights}


def write_lora(lora: Mapping[str, Any], directory: Path) -> None:
    """Write adapters read by :func:`read_lora` back in peft's own file format."""
    import json

    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / LORA_CONFIG).write_text(json.dumps(lora["config"], indent=2, sort_keys=True) + "\n")
    save_file({k: v.contiguous() for k, v in lora["weights"].items()}, str(directory / LORA_WEIGHTS),
              metadata={"format": "pt"})


def attach_lora(unet: Any, lora: Mapping[str, Any]) -> Any:
    """``unet`` itself, its layers now carrying the adapters (attached by peft's own loader, inference mode)."""
    from brainfm.models.heads import load_lora

    with tempfile.TemporaryDirectory(prefix="brainfm-lora-") as tmp:
        write_lora(lora, Path(tmp))
        load_lora(unet, tmp)
    return unet


def merge_lora(unet: Any, lora: Mapping[str, Any]) -> Any:
    """A copy of ``unet`` with the adapters merged into its weights: a plain network again (no peft layers), as
    fast as the original; ``unet`` itself is left as it was."""
    from brainfm.models.heads import load_lora

    with tempfile.TemporaryDirectory(prefix="brainfm-lora-") as tmp:
        write_lora(lora, Path(tmp))
        return load_lora(copy.deepcopy(unet), tmp).merge_and_unload()


__all__ = ["HEAD_CONFIG", "HEAD_SUBDIR", "HeadPredictor", "LORA_SUBDIR", "attach_lora", "merge_lora", "read_lora",
           "write_lora"]
