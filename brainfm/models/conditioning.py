"""Scan metadata (modality, sex, site, age, slice position, volumes) as cross-attention tokens.

Each categorical field and each scalar becomes one token; a tiny BERT encoder built from a ``transformers`` config
(trained from scratch, nothing downloaded) lets tokens interact; a linear map gives the UNet's cross-attention
context. Missing values are first-class: an unknown category maps to index 0 and a missing scalar to a learned
"missing" token, so partly annotated datasets train without imputation. A learned null context serves conditioning
dropout and classifier-free guidance.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn
from transformers import BertConfig, BertModel

DEFAULT_SCALAR_NORMS: dict[str, dict[str, float]] = {
    # population-level (mean, std) so standardised scalars are O(1); override per dataset via scalar_norms
    "age": {"mean": 50.0, "std": 20.0},
    "slice_position": {"mean": 0.5, "std": 0.29},
    "brain_volume_ml": {"mean": 1150.0, "std": 150.0},
    "gm_fraction": {"mean": 0.45, "std": 0.06},
    "wm_fraction": {"mean": 0.35, "std": 0.06},
}
CATEGORICAL_FIELDS = ("modality", "sex", "site")
_UNKNOWN_NAMES = {"", "UNKNOWN", "NONE", "NAN", "N/A", "NA"}
_SEX_ALIASES = {"FEMALE": "F", "MALE": "M", "WOMAN": "F", "MAN": "M"}
STANDARDISED_CLAMP = 10.0  # a scalar given in the wrong unit (mm^3 for ml) must not blow up the encoder


def _vocabulary(values: Sequence[str]) -> dict[str, int]:
    """Upper-cased name -> index; index 0 is reserved for unknown/missing."""
    vocab: dict[str, int] = {}
    for value in values:
        name = str(value).strip().upper()
        if name not in _UNKNOWN_NAMES and name not in vocab:
            vocab[name] = len(vocab) + 1
    return vocab


def _as_float(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


class Conditioner(ModelMixin, ConfigMixin):
    """Metadata → (B, T, cross_attention_dim) context, T = 3 categorical tokens + one per scalar key."""

    @register_to_config
    def __init__(
        self,
        modalities: Sequence[str] = ("T1", "T2", "FLAIR", "PD", "CT"),
        sites: Sequence[str] = ("unknown",),
        sexes: Sequence[str] = ("F", "M"),
        scalar_keys: Sequence[str] = (
            "age",
            "slice_position",
            "brain_volume_ml",
            "gm_fraction",
            "wm_fraction",
        ),
        scalar_norms: Mapping[str, Mapping[str, float]] | None = None,
        hidden_size: int = 64,
        num_layers: int = 1,
        num_heads: int = 4,
        cross_attention_dim: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
        self.vocabularies = {
            "modality": _vocabulary(modalities),
            "sex": _vocabulary(sexes),
            "site": _vocabulary(sites),
        }
        self.scalar_keys = tuple(scalar_keys)
        norms = {**DEFAULT_SCALAR_NORMS, **{k: dict(v) for k, v in (scalar_norms or {}).items()}}
        for key in self.scalar_keys:
            norm = norms.get(key, {"mean": 0.0, "std": 1.0})
            if not float(norm.get("std", 1.0)) > 0:
                raise ValueError(f"scalar_norms[{key!r}]['std'] must be positive")
        self.register_buffer(
            "scalar_mean",
            torch.tensor([float(norms.get(k, {}).get("mean", 0.0)) for k in self.scalar_keys]),
            persistent=False,
        )
        self.register_buffer(
            "scalar_std",
            torch.tensor([float(norms.get(k, {}).get("std", 1.0)) for k in self.scalar_keys]),
            persistent=False,
        )
        self.category_embeddings = nn.ModuleDict(
            {
                field: nn.Embedding(len(self.vocabularies[field]) + 1, hidden_size)
                for field in CATEGORICAL_FIELDS
            }
        )
        num_scalars = len(self.scalar_keys)
        self.scalar_value_vectors = nn.Parameter(torch.randn(num_scalars, hidden_size) * 0.02)
        self.scalar_key_embeddings = nn.Parameter(torch.randn(num_scalars, hidden_size) * 0.02)
        self.scalar_missing_embeddings = nn.Parameter(torch.randn(num_scalars, hidden_size) * 0.02)
        bert_config = BertConfig(
            vocab_size=1,  # inputs come as embeddings; the word table is never used
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=4 * hidden_size,
            max_position_embeddings=max(8, len(CATEGORICAL_FIELDS) + num_scalars),
            type_vocab_size=2,  # 0 = categorical token, 1 = scalar token
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
        )
        self.transformer = BertModel(bert_config, add_pooling_layer=False)
        # Never in the graph: frozen, or DDP waits for its gradient and fails at the second step.
        self.transformer.embeddings.word_embeddings.requires_grad_(False)
        self.projection = nn.Linear(hidden_size, cross_attention_dim)
        self.null_tokens = nn.Parameter(torch.randn(self.num_tokens, cross_attention_dim) * 0.02)

    @property
    def num_tokens(self) -> int:
        return len(CATEGORICAL_FIELDS) + len(self.scalar_keys)

    def _category_index(self, field: str, value: Any) -> int:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return 0
        name = str(value).strip().upper()
        if field == "sex":
            name = _SEX_ALIASES.get(name, name)
        return self.vocabularies[field].get(name, 0)

    def tokenize(
        self, meta: Sequence[Mapping[str, Any]], slice_position: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Per-sample metadata dicts → integer/float tensors on this model's device.

        Scalars are read from ``meta["scalars"][key]`` or a flat ``meta[key]``; ``slice_position`` (B,), when given,
        overrides the metadata (2D slices of one volume share their meta). Unknown categories → index 0; missing,
        NaN or non-numeric scalars → ``scalar_present`` False (and value 0).
        """
        batch = len(meta)
        if slice_position is not None and slice_position.reshape(-1).shape[0] != batch:
            raise ValueError(f"slice_position has {slice_position.numel()} values for a batch of {batch}")
        categorical = torch.zeros(batch, len(CATEGORICAL_FIELDS), dtype=torch.long)
        values = torch.zeros(batch, len(self.scalar_keys), dtype=torch.float32)
        present = torch.zeros(batch, len(self.scalar_keys), dtype=torch.bool)
        positions = (
            None if slice_position is None else slice_position.detach().float().reshape(-1).cpu().tolist()
        )
        for row, sample in enumerate(meta):
            for col, field in enumerate(CATEGORICAL_FIELDS):
                categorical[row, col] = self._category_index(field, sample.get(field))
            nested = sample.get("scalars") or {}
            for col, key in enumerate(self.scalar_keys):
                raw = nested.get(key, sample.get(key))
                if key == "slice_position" and positions is not None:
                    raw = positions[row]
                number = _as_float(raw)
                if number is not None:
                    values[row, col] = number
                    present[row, col] = True
        device = self.device
        return {
            "categorical": categorical.to(device),
            "scalar_values": values.to(device),
            "scalar_present": present.to(device),
        }

    def forward(self, tokens: Mapping[str, Tensor], drop_mask: Tensor | None = None) -> Tensor:
        """Context (B, T, cross_attention_dim); rows where ``drop_mask`` is True get the learned null context."""
        categorical = tokens["categorical"].to(self.device)
        present = tokens["scalar_present"].to(self.device).bool()
        dtype = self.scalar_value_vectors.dtype
        values = torch.nan_to_num(
            tokens["scalar_values"].to(self.device, dtype), nan=0.0, posinf=0.0, neginf=0.0
        )
        standardised = ((values - self.scalar_mean.to(dtype)) / self.scalar_std.to(dtype)).clamp(
            -STANDARDISED_CLAMP, STANDARDISED_CLAMP
        )
        standardised = torch.where(present, standardised, torch.zeros_like(standardised))
        category_tokens = torch.stack(
            [
                self.category_embeddings[field](categorical[:, i])
                for i, field in enumerate(CATEGORICAL_FIELDS)
            ],
            dim=1,
        )
        scalar_tokens = standardised.unsqueeze(-1) * self.scalar_value_vectors + self.scalar_key_embeddings
        scalar_tokens = torch.where(
            present.unsqueeze(-1), scalar_tokens, self.scalar_missing_embeddings.expand_as(scalar_tokens)
        )
        embeddings = torch.cat([category_tokens, scalar_tokens], dim=1)
        token_types = torch.cat(
            [
                torch.zeros(len(CATEGORICAL_FIELDS), dtype=torch.long, device=self.device),
                torch.ones(len(self.scalar_keys), dtype=torch.long, device=self.device),
            ]
        ).expand(embeddings.shape[0], -1)
        hidden = self.transformer(inputs_embeds=embeddings, token_type_ids=token_types).last_hidden_state
        context = self.projection(hidden)
        if drop_mask is not None:
            drop = drop_mask.to(self.device).bool().reshape(-1, 1, 1)
            context = torch.where(drop, self.null_tokens.to(context.dtype).expand_as(context), context)
        return context

    def null_context(self, batch_size: int) -> Tensor:
        """The learned "no metadata" context, (batch_size, T, cross_attention_dim)."""
        return self.null_tokens.unsqueeze(0).expand(batch_size, -1, -1)
