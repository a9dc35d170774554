from __future__ import annotations

import math

import torch

from brainfm.models import Conditioner


def tiny_encoder() -> Conditioner:
    return Conditioner(
        sites=("siteA", "siteB"), hidden_size=16, num_heads=2, cross_attention_dim=24
    ).eval()


def test_tokenize_handles_missing_and_unknown(meta_records):
    conditioner = tiny_encoder()
    records = meta_records + [
        {"modality": "t2", "sex": "female", "site": "SITEB", "age": float("nan"), "slice_position": "n/a"},
        {"modality": "XYZ", "sex": None, "scalars": {"age": None, "gm_fraction": math.inf}},
    ]
    tokens = conditioner.tokenize(records, slice_position=torch.tensor([0.1, 0.2, 0.3, 0.4]))
    keys = list(conditioner.config.scalar_keys)
    # modality index: 0 unknown, then T1=1, T2=2, FLAIR=3, PD=4, CT=5; sex F=1, M=2; site A=1, B=2
    assert tokens["categorical"].tolist() == [[1, 1, 0], [3, 2, 0], [2, 1, 2], [0, 0, 0]]
    present = tokens["scalar_present"]
    assert present[:, keys.index("slice_position")].all()  # given explicitly, overrides the meta
    assert tokens["scalar_values"][:, keys.index("slice_position")].tolist() == [
        float(torch.tensor(v)) for v in (0.1, 0.2, 0.3, 0.4)
    ]
    assert (
        present[0, keys.index("age")]
        and not present[2, keys.index("age")]
        and not present[3, keys.index("age")]
    )
    assert present[1, keys.index("gm_fraction")] and not present[3, keys.index("gm_fraction")]
    assert float(tokens["scalar_values"][~present].abs().sum()) == 0.0
    context = conditioner(tokens)
    assert context.shape == (4, conditioner.num_tokens, 24) and torch.isfinite(context).all()


def test_nan_scalars_give_finite_gradients():
    conditioner = tiny_encoder().train()
    tokens = conditioner.tokenize([{"modality": "T1", "age": float("nan")}, {"modality": "CT", "age": 60}])
    tokens["scalar_values"][0, 0] = float("nan")  # even a NaN that slipped into the tensor stays harmless
    conditioner(tokens).square().mean().backward()
    grads = [p.grad for p in conditioner.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_drop_mask_rows_equal_null_context(meta_records):
    conditioner = tiny_encoder()
    tokens = conditioner.tokenize(meta_records)
    full = conditioner(tokens)
    dropped = conditioner(tokens, drop_mask=torch.tensor([False, True]))
    null = conditioner.null_context(2)
    assert torch.equal(dropped[1], null[1])
    assert torch.equal(dropped[0], full[0])
    assert (full[1] - null[1]).abs().max() > 1e-3


def test_different_metadata_different_context():
    conditioner = tiny_encoder()
    base = {"modality": "T1", "sex": "F", "site": "siteA", "age": 30.0}
    variants = [
        dict(base),
        {**base, "age": 80.0},
        {**base, "modality": "CT"},
        {**base, "sex": "M"},
        {**base, "site": "siteB"},
    ]
    context = conditioner(conditioner.tokenize(variants))
    for row in range(1, len(variants)):
        assert (context[row] - context[0]).abs().max() > 1e-4, variants[row]
    again = conditioner(conditioner.tokenize([dict(base)]))
    assert torch.equal(again[0], context[0])
