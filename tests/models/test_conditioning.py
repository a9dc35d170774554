from __future__ import annotations

import math

import torch

from brainfm.models import Conditioner


def tiny_encoder() -> Conditioner:
    return Conditioner(
        sites=("siteA", "siteB"), hidden_size=16, num_heads=2, cross_attention_dim=24
    ).eval()


def test_tokenize_handles_missing_and_unknown(meta_records):
    encoder = tiny_encoder()
    records = meta_records + [
        {"modality": "t2", "sex": "female", "site": "SITEB", "age": float("nan"), "slice_position": "n/a"},
        {"modality": "XYZ", "sex": None, "scalars": {"age": None, "gm_fraction": math.inf}},
    ]
    tokens = encoder.tokenize(records, slice_position=torch.tensor([0.1, 0.2, 0.3, 0.4]))
    keys = list(encoder.config.scalar_keys)
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
    context = encoder(tokens)
    assert context.shape == (4, encoder.num_tokens, 24) and torch.isfinite(context).all()


def test_nan_scalars_give_finite_gradients():
    encoder = tiny_encoder().train()
    tokens = encoder.tokenize([{"modality": "T1", "age": float("nan")}, {"modality": "CT", "age": 60}])
    tokens["scalar_values"][0, 0] = float("nan")  # even a NaN that slipped into the tensor stays harmless
    encoder(tokens).square().mean().backward()
    grads = [p.grad for p in encoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_drop_mask_rows_equal_null_context(meta_records):
    encoder = tiny_encoder()
    tokens = encoder.tokenize(meta_records)
    full = encoder(tokens)
    dropped = encoder(tokens, drop_mask=torch.tensor([False, True]))
    null = encoder.null_context(2)
    assert torch.equal(dropped[1], null[1])
    assert torch.equal(dropped[0], full[0])
    assert (full[1] - null[1]).abs().max() > 1e-3


def test_different_metadata_different_context():
    encoder = tiny_encoder()
    base = {"modality": "T1", "sex": "F", "site": "siteA", "age": 30.0}
    variants = [
        dict(base),
        {**base, "age": 80.0},
        {**base, "modality": "CT"},
        {**base, "sex": "M"},
        {**base, "site": "siteB"},
    ]
    context = encoder(encoder.tokenize(variants))
    for row in range(1, len(variants)):
        assert (context[row] - context[0]).abs().max() > 1e-4, variants[row]
    again = encoder(encoder.tokenize([dict(base)]))
    assert torch.equal(again[0], context[0])


def test_round_trip_identical(meta_records, tmp_path):
    encoder = Conditioner(
        hidden_size=16, num_heads=2, cross_attention_dim=16, scalar_norms={"age": {"mean": 40.0, "std": 10.0}}
    ).eval()
    tokens = encoder.tokenize(meta_records)
    encoder.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    loaded = Conditioner.from_pretrained(tmp_path).eval()
    assert loaded.config.scalar_norms["age"] == {"mean": 40.0, "std": 10.0}
    assert torch.equal(loaded(tokens), encoder(tokens))
    assert torch.equal(loaded.null_context(2), encoder.null_context(2))
