"""Heads trained through the shared Accelerate loop on tiny template-derived lesion data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from brainfm.anomaly.deviation import binarize, eroded_mask
from brainfm.finetune.evaluate import head_scores, record_probability, score_maps, unsupervised_scores
from brainfm.finetune.features import FeatureSet, hide_label
from brainfm.finetune.run import train_head
from brainfm.finetune.split import seen_subjects
from brainfm.io import BrainFMInputError


def _split(features: FeatureSet):
    """Head calibration on two healthy subjects the foundation model never saw, unlabelled training on the ones it
    was pretrained and calibrated on, two lesion subjects of each kind to train, the rest held out."""
    records = features.by_name()
    seen = seen_subjects(features.source["model"])
    unseen_healthy = [r for r in features.records if not r.has_lesion and r.subject not in seen]
    calibration = unseen_healthy[:2]
    healthy_train = [r for r in features.records if not r.has_lesion and r.subject in seen]
    lesions = [records[f"{kind}-{i}"] for kind in ("tumour", "stroke") for i in range(2)]
    held_out = [records["tumour-2"], records["stroke-2"], *unseen_healthy[2:4]]
    assert len(held_out) == 4 and len(healthy_train) == 3
    return calibration, healthy_train, lesions, held_out


def test_head_fits_its_labels_and_is_scored_only_on_unseen_scans(feature_set, finetune_config, tmp_path):
    """The head learns its labels beyond the map it starts from, measured on its training scans by calling
    ``score_maps`` directly (``head_scores`` refuses them). On the two held-out lesion subjects this 40-step head
    on an untrained foundation model is near chance (as is the map: pooled AUPRC about 0.02 for both), so its
    held-out scores are checked for what they count, not for a gain."""
    calibration, healthy_train, lesions, held_out = _split(feature_set)
    config = finetune_config(tmp_path, head={"network": {"channels": (8, 16, 32)}},
                                  data={"batch_size": 8, "unlabelled_batch_size": 4})
    predictor = train_head(config, tmp_path / "head", feature_set, lesions, healthy_train, calibration)
    fitted = score_maps(lesions, [record_probability(predictor, r) for r in lesions], predictor.threshold,
                        predictor.deviation)
    reference = unsupervised_scores(lesions, feature_set.z_threshold, feature_set.deviation)
    assert fitted["dice"] > reference["dice"] + 0.1, (fitted, reference)
    assert fitted["auprc"] > reference["auprc"], (fitted, reference)
    head = head_scores(predictor, held_out)
    assert (head["n_test"], head["n_test_subjects"], head["n_healthy_test"]) == (2, 2, 2)
    assert 0.0 <= head["auprc"] <= 1.0 and head["dice_ci"] is not None
    # the threshold was calibrated on healthy scans at the map's false-positive rate and stored with the head
    info = json.loads((tmp_path / "head" / "head_config.json").read_text())
    assert info["threshold"] == predictor.threshold and 0.0 < info["threshold"] < 1.0
    assert info["calibration_scans"] == [r.name for r in calibration]
    assert info["calibration_subjects"] == sorted(r.subject for r in calibration)
    assert info["labelled_subjects"] == sorted(r.subject for r in lesions)
    # ... and on other healthy subjects it flags about that rate, counted over the same (eroded) brain region
    predictions = [binarize(record_probability(predictor, r), predictor.threshold, r.mask, feature_set.deviation)
                   for r in held_out[2:]]
    regions = [eroded_mask(r.mask, feature_set.deviation.mask_erosion_vox) for r in held_out[2:]]
    flagged = sum(int((p & m).sum()) for p, m in zip(predictions, regions, strict=True))
    assert head["fp_rate"] == pytest.approx(flagged / sum(int(m.sum()) for m in regions))
    assert head["fp_rate"] < 5 * feature_set.deviation.target_fpr, head
    records = [json.loads(line) for line in (tmp_path / "head" / "logs" / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 41))
    assert {"dice_loss", "bce", "pseudo", "consistency"} <= set(records[0]["parts"])
    first, last = np.mean([r["losses"]["head"] for r in records[:5]]), np.mean([r["losses"]["head"] for r in records[-5:]])
    assert last < 0.8 * first, (first, last)
    # never scored on what it trained or was calibrated on
    for seen in (lesions[:1], calibration[1:], healthy_train[:1]):
        with pytest.raises(BrainFMInputError, match="in both the head's training or calibration scans and the scans"):
            head_scores(predictor, held_out + seen)


def test_head_calibration_must_not_share_subjects_with_its_training_data(feature_set, finetune_config, tmp_path):
    calibration, healthy_train, lesions, _ = _split(feature_set)
    config = finetune_config(tmp_path, optim={"max_steps": 1})
    with pytest.raises(BrainFMInputError, match="1 subject.*healthy-0"):
        train_head(config, tmp_path / "run", feature_set, lesions, healthy_train, calibration + healthy_train[:1])
    assert not (tmp_path / "run").exists()  # refused before training


def _losses(run_dir):
    return [json.loads(line) for line in (run_dir / "logs" / "losses.jsonl").read_text().splitlines()]


def test_interrupted_head_run_resumes_to_the_same_losses(feature_set, finetune_config, tmp_path):
    calibration, healthy_train, lesions, _ = _split(feature_set)
    lesions = lesions[:2]
    straight = finetune_config(tmp_path / "a", optim={"max_steps": 6}, train={"checkpoint_every": 3})
    train_head(straight, tmp_path / "a" / "run", feature_set, lesions, healthy_train, calibration)
    first = finetune_config(tmp_path / "b", optim={"max_steps": 3}, train={"checkpoint_every": 3})
    train_head(first, tmp_path / "b" / "run", feature_set, lesions, healthy_train, calibration)
    resumed = finetune_config(tmp_path / "b", optim={"max_steps": 6}, train={"checkpoint_every": 3})
    train_head(resumed, tmp_path / "b" / "run", feature_set, lesions, healthy_train, calibration, resume="auto")
    a, b = _losses(tmp_path / "a" / "run"), _losses(tmp_path / "b" / "run")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b, strict=True):
        assert x["losses"]["head"] == pytest.approx(y["losses"]["head"], rel=1e-5, abs=1e-6), (x, y)
    # an unfinished run is not silently restarted over its checkpoints
    with pytest.raises(BrainFMInputError, match="resume"):
        train_head(resumed, tmp_path / "b" / "run", feature_set, lesions, healthy_train, calibration)
    assert sorted(p.name for p in (tmp_path / "b" / "run" / "checkpoints").iterdir()) == ["step-3", "step-6"]


def test_unlabelled_samples_carry_only_confident_pseudo_labels(feature_set):
    from brainfm.finetune.task import build_samples

    record = next(r for r in feature_set.records if r.has_lesion)
    samples = build_samples([hide_label(record)], 2, z_threshold=feature_set.z_threshold, low_z=0.5)
    target, weight, zmap = (samples.tensors[k] for k in ("target", "weight", "zmap"))
    mask = samples.tensors["mask"] > 0
    assert torch.equal(target > 0, (zmap > feature_set.z_threshold) & mask)  # no label leaks into the targets
    confident = mask & ((zmap > feature_set.z_threshold) | (zmap < 0.5))
    assert torch.equal(weight > 0, confident) and 0 < int(confident.sum()) < int(mask.sum())
    # with the map's post-processing, pseudo-lesions are exactly the calibrated binary mask (specks dropped)
    processed = build_samples([hide_label(record)], 2, z_threshold=feature_set.z_threshold, low_z=0.5,
                              deviation=feature_set.deviation, min_brain_fraction=0.0)
    expected = binarize(record.zmap, feature_set.z_threshold, record.mask, feature_set.deviation)
    kept = [z for z in range(record.mask.shape[-1]) if record.mask[..., z].mean() > 0.0]
    assert np.array_equal(processed.tensors["target"][:, 0].permute(1, 2, 0).numpy() > 0, expected[..., kept])
    assert int(processed.tensors["target"].sum()) <= int(target.sum())
    labelled = build_samples([record], 2, z_threshold=feature_set.z_threshold, low_z=0.5, negatives_per_positive=1.0)
    lesion_slices = int(record.label.reshape(-1, record.label.shape[-1]).any(axis=0).sum())
    assert len(labelled) <= 2 * lesion_slices and float(labelled.tensors["target"].sum()) == float(record.label.sum())


def _keys(batch) -> list[str]:
    return [m["__key__"] for m in batch["meta"]]


def test_head_stream_deals_disjoint_shares_to_ranks_and_resumes_exactly():
    from brainfm.finetune.task import HeadStream, Samples

    def samples(n: int) -> Samples:
        return Samples(tensors={"scan": torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1)},
                       meta=[{"__key__": f"s{i}"} for i in range(n)], disease=[None] * n, slice_position=None)

    ranks = [HeadStream(samples(10), samples(4), 5, 2, seed=3, rank=r, world_size=2) for r in (0, 1)]
    epoch = [_keys(stream.next()) for stream in ranks]
    assert not set(epoch[0]) & set(epoch[1]) and set(epoch[0]) | set(epoch[1]) == {f"s{i}" for i in range(10)}
    single = HeadStream(samples(10), samples(4), 5, 2, seed=3)
    order = _keys(single.next()) + _keys(single.next())  # the single-process order, dealt round-robin to ranks
    assert epoch == [order[0::2], order[1::2]]
    state = ranks[1].state_dict()
    following = [_keys(ranks[1].next()) for _ in range(3)]
    resumed = HeadStream(samples(10), samples(4), 5, 2, seed=3, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert [_keys(resumed.next()) for _ in range(3)] == following
    # fewer samples than ranks: every rank reads them all rather than nothing
    few = [HeadStream(samples(1), None, 1, 0, seed=0, rank=r, world_size=2) for r in (0, 1)]
    assert [_keys(stream.next()) for stream in few] == [["s0"], ["s0"]]
