"""Heads at inference: probability maps, the healthy-calibrated threshold, and scores comparable with the map.

A head's probability threshold is set exactly like the unsupervised z threshold: the (1 - target_fpr) quantile of
its values over the eroded brain of HEALTHY calibration scans. Both maps are then binarised with the same
post-processing (erosion, small-component removal) and scored by the same ``MetricAccumulator``, so "Dice at the
healthy-calibrated threshold" means the same thing for the head, the scratch baseline and the unsupervised map.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainfm.anomaly.deviation import binarize, eroded_mask, upper_threshold
from brainfm.config import DeviationConfig, from_dict, to_dict
from brainfm.finetune.features import ScanRecord
from brainfm.finetune.task import HEAD_CONFIG, HEAD_SUBDIR, LORA_SUBDIR, write_head_info
from brainfm.io import BrainFMInputError
from brainfm.models.heads import LesionHead, UNetFeatures


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
    def load(cls, head_dir: str | os.PathLike, model_dir: str | os.PathLike | None = None) -> HeadPredictor:
        """``HEAD_DIR`` = a head run folder (``head/``, optional ``lora/``, ``head_config.json``) or its ``head/``
        folder alone (which carries a copy of ``head_config.json``). A head that uses UNet features needs the
        foundation model folder (``model_dir``, default: the one it was trained on)."""
        head_dir = Path(head_dir)
        weights = head_dir / HEAD_SUBDIR if (head_dir / HEAD_SUBDIR / "config.json").is_file() else head_dir
        if not (weights / "config.json").is_file():
            raise BrainFMInputError(head_dir, "not a head folder (no head/config.json or config.json)")
        config_path = weights / HEAD_CONFIG if (weights / HEAD_CONFIG).is_file() else head_dir / HEAD_CONFIG
        try:
            info = json.loads(config_path.read_text())
        except FileNotFoundError:
            raise BrainFMInputError(config_path, "not a head folder (head_config.json missing)") from None
        except (OSError, ValueError) as exc:
            raise BrainFMInputError(config_path, f"unreadable head config ({exc})") from exc
        try:
            head = LesionHead.from_pretrained(str(weights), use_safetensors=True, local_files_only=True)
        except Exception as exc:  # diffusers raises OSError/ValueError/RuntimeError for bad configs and weights
            raise BrainFMInputError(weights, f"cannot load the head ({type(exc).__name__}: {exc})") from exc
        features = None
        if head.config.feature_channels:
            from brainfm.anomaly.pipeline import load_model_dir
            from brainfm.models.heads import load_lora

            model = load_model_dir(model_dir or info.get("model"), device="cpu")
            if info.get("lora"):
                lora_dir = next((d / LORA_SUBDIR for d in (head_dir, weights, head_dir.parent)
                                 if (d / LORA_SUBDIR).is_dir()), head_dir / LORA_SUBDIR)
                load_lora(model.unet, lora_dir)
            features = UNetFeatures(model.vae, model.unet, model.encoder, int(info["feature_timestep"]))
        deviation = from_dict(DeviationConfig, info["deviation"]) if "deviation" in info else None
        run_dir = weights.parent if weights != head_dir else head_dir
        return cls(head, features, threshold=info.get("threshold"), deviation=deviation, info=info, path=run_dir)

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
        tensors = torch.from_numpy(np.ascontiguousarray(maps))
        scan, pseudo, zmap = tensors[0], tensors[1], tensors[2]
        batch = scan.shape[0]
        features = None
        if self.features is not None:
            if anatomy is None:
                raise ValueError("this head uses UNet features: pass the scan's anatomy maps")
            slab = torch.from_numpy(np.ascontiguousarray(anatomy, dtype=np.float32))
            features = self.features(scan, slab, [dict(meta or {})] * batch, positions)
        x = self.head.assemble(scan, pseudo, zmap, features)
        tokens = None if token is None else token.expand(batch)
        logits = self.head(x, tokens)[:, channel]
        return torch.sigmoid(logits).numpy()

    def predict(self, image: np.ndarray, pseudo_healthy: np.ndarray, zmap: np.ndarray, mask: np.ndarray,
                anatomy: np.ndarray | None = None, meta: Mapping[str, Any] | None = None,
                disease: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(probability map, binary mask at the calibrated threshold or None if uncalibrated) on the model grid,
        binarised with the same post-processing as the z-map."""
        probability = self.probability(image, pseudo_healthy, zmap, mask, anatomy, meta, disease)
        if self.threshold is None:
            return probability, None
        return probability, binarize(probability, self.threshold, np.asarray(mask) > 0, self.deviation)

    def protocol(self) -> dict[str, Any]:
        """What a report must state about the head: where it is, its inputs and its calibrated threshold."""
        return {"head": str(self.path), "threshold": self.threshold, "target_fpr": self.info.get("target_fpr"),
                "threshold_calibration": "quantile of head probability over the eroded brain of healthy scans",
                "inputs": list(self.head.config.inputs), "diseases": list(self.head.config.diseases),
                "unet_features": self.features is not None, "lora": bool(self.info.get("lora")),
                **{k: v for k, v in to_dict(self.deviation).items() if k in ("mask_erosion_vox", "min_component_vox")}}

    def record_probability(self, record: ScanRecord, disease: str | None = None) -> np.ndarray:
        return self.probability(record.image, record.pseudo_healthy, record.zmap, record.mask, record.anatomy,
                                record.meta, disease)


# ------------------------------------------------------------------------------------------------ calibration
def calibrate_threshold(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], deviation: DeviationConfig) -> float:
    """(1 - target_fpr) quantile of the maps over the eroded brain of healthy scans."""
    values = [np.asarray(m)[eroded_mask(np.asarray(b) > 0, deviation.mask_erosion_vox)] for m, b in zip(maps, masks,
                                                                                                       strict=True)]
    if not values or sum(v.size for v in values) == 0:
        raise BrainFMInputError(None, "no healthy brain voxels to calibrate the head threshold on")
    return float(upper_threshold(np.concatenate(values), deviation.target_fpr))


def calibrate_head(predictor: HeadPredictor, healthy: Sequence[ScanRecord], deviation: DeviationConfig) -> float:
    """Set and store (in ``head_config.json``) the head's threshold at the map's healthy false-positive rate."""
    maps = [predictor.record_probability(r) for r in healthy]
    threshold = calibrate_threshold(maps, [r.mask for r in healthy], deviation)
    predictor.threshold, predictor.deviation = threshold, deviation
    if predictor.path is not None:
        info = {**predictor.info, "threshold": threshold, "target_fpr": deviation.target_fpr,
                "deviation": to_dict(deviation), "calibration_scans": [r.name for r in healthy]}
        write_head_info(predictor.path, info)
        predictor.info = info
    return threshold


# ------------------------------------------------------------------------------------------------ scoring
def score_maps(records: Sequence[ScanRecord], maps: Sequence[np.ndarray], threshold: float,
               deviation: DeviationConfig) -> dict[str, Any]:
    """Dice at ``threshold`` (healthy-calibrated), pooled AUPRC and friends over ``records``."""
    from brainfm.evaluation import MetricAccumulator

    accumulator = MetricAccumulator(threshold=threshold)
    for record, score in zip(records, maps, strict=True):
        prediction = binarize(score, threshold, record.mask, deviation)
        accumulator.add(score, record.label, record.mask, prediction, lesion_type=record.lesion_type,
                        voxel_volume_ml=record.voxel_volume_ml, scan_id=record.name)
    metrics = accumulator.compute()
    overall = metrics["overall"]
    return {
        "dice": overall.get("dice_mean"),
        "auprc": overall.get("auprc_pooled"),
        "auprc_per_volume_mean": overall.get("auprc_per_volume_mean"),
        "dice_oracle": overall.get("dice_oracle"),
        "threshold": float(threshold),
        "n_scans": len(records),
    }


def unsupervised_scores(records: Sequence[ScanRecord], z_threshold: float, deviation: DeviationConfig) -> dict[str, Any]:
    """The reference: the foundation model's calibrated z-map, no labels used."""
    return score_maps(records, [r.zmap for r in records], z_threshold, deviation)


def head_scores(predictor: HeadPredictor, records: Sequence[ScanRecord], disease: str | None = None) -> dict[str, Any]:
    if predictor.threshold is None:
        raise BrainFMInputError(predictor.path, "head is not calibrated (no threshold in head_config.json)")
    maps = [predictor.record_probability(r, disease if disease is not None else None) for r in records]
    return score_maps(records, maps, predictor.threshold, predictor.deviation)


__all__ = ["HeadPredictor", "calibrate_head", "calibrate_threshold", "head_scores", "score_maps",
           "unsupervised_scores"]
