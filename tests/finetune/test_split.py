"""The fine-tuning split goes by subject: training, head calibration and test share no subject, and head
calibration and test hold no subject the foundation model was pretrained or calibrated on (read off its model
folder). Records here are tiny stand-ins: the split looks at names, subjects and labels only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from brainfm.config import DeviationConfig, FinetuneDataSection
from brainfm.data.manifest import ManifestRow
from brainfm.data.writer import sample_key
from brainfm.finetune.features import FeatureSet, ScanRecord
from brainfm.finetune.split import (
    SeenSubjects,
    check_disjoint,
    seen_subjects,
    split_cohort,
    subject_of_key,
)
from brainfm.io import BrainFMInputError


def _record(name: str, subject: str, kind: str | None) -> ScanRecord:
    label = None if kind is None else np.ones((2, 2, 2), np.uint8)
    return ScanRecord(name=name, subject=subject, image=np.zeros((2, 2, 2), np.float32),
                      mask=np.ones((2, 2, 2), bool), anatomy=np.zeros((1, 2, 2, 2), np.float32), meta={},
                      label=label, lesion_type=kind or "healthy")


def _cohort(n_healthy: int = 10, n_per_kind: int = 6) -> FeatureSet:
    """Two scans (T1, FLAIR) per subject, as a multi-contrast cohort has."""
    subjects = [(f"h{i:02d}", None) for i in range(n_healthy)]
    subjects += [(f"{kind[0]}{i:02d}", kind) for kind in ("tumour", "stroke") for i in range(n_per_kind)]
    records = [_record(f"{s}_{m}", s, kind) for s, kind in subjects for m in ("T1", "FLAIR")]
    return FeatureSet(records=records, z_threshold=1.0, deviation=DeviationConfig(), source={"manifest": "c.csv"})


def _seen(*subjects: str) -> SeenSubjects:
    return SeenSubjects(roles={"pretraining split 'train' of shards": frozenset(subjects)}, policy="from_model")


def test_split_is_disjoint_by_subject_and_keeps_seen_subjects_out_of_calibration_and_test():
    features = _cohort()
    seen = _seen("h00", "h01", "h02", "t00", "s00", "s01")
    config = FinetuneDataSection(n_calibration_healthy=3, min_healthy_test=2, test_fraction=0.5, seed=3)
    split = split_cohort(features, config, seen)
    subject = split.subjects
    roles = split.roles()
    assert not set(roles["training"]) & set(roles["calibration"])
    assert not set(roles["training"]) & set(roles["test"])
    assert not set(roles["calibration"]) & set(roles["test"])
    assert not {"h00", "h01", "h02", "t00", "s00", "s01"} & set(roles["calibration"] + roles["test"])
    assert split.seen["cohort_subjects_seen"] == ["h00", "h01", "h02", "s00", "s01", "t00"]
    # a subject's scans travel together; every scan of the cohort has exactly one role
    for names in (split.calibration, split.healthy_test, *split.test.values(), *split.train_pool.values()):
        assert all(f"{subject[n]}_T1" in names and f"{subject[n]}_FLAIR" in names for n in names)
    placed = (split.calibration + split.healthy_train + split.healthy_test
              + [n for v in (*split.test.values(), *split.train_pool.values()) for n in v])
    assert sorted(placed) == sorted(r.name for r in features.records)
    # 7 unseen healthy subjects: 3 calibrate, half of the other 4 test, the rest train with the 3 seen ones
    assert len(split.calibration) == 2 * 3 and len(split.healthy_test) == 2 * 2
    assert {subject[n] for n in split.healthy_train} >= {"h00", "h01", "h02"}
    # lesions: half of each kind tests (3 of 6), drawn from unseen subjects; seen ones train
    assert [len({subject[n] for n in split.test[k]}) for k in ("stroke", "tumour")] == [3, 3]
    assert {"t00", "s00", "s01"} <= {subject[n] for v in split.train_pool.values() for n in v}
    assert split_cohort(features, config, seen) == split  # seeded
    other = split_cohort(features, FinetuneDataSection(n_calibration_healthy=3, seed=4), seen)
    assert other.calibration != split.calibration


def test_split_refuses_when_too_few_unseen_healthy_subjects_are_left():
    features = _cohort(n_healthy=6)
    config = FinetuneDataSection(n_calibration_healthy=3, min_healthy_test=2)
    split_cohort(features, config, _seen("h00"))  # 5 unseen: enough
    with pytest.raises(BrainFMInputError, match=r"c\.csv: 4 of 6 healthy subjects are unseen.*needs 3.*2") as info:
        split_cohort(features, config, _seen("h00", "h01"))
    assert "\n" not in str(info.value)


def test_a_split_whose_roles_share_a_subject_is_refused():
    split = split_cohort(_cohort(), FinetuneDataSection(n_calibration_healthy=2), _seen())
    leaked = split.healthy_test[0]
    split.healthy_train.append(leaked)
    with pytest.raises(BrainFMInputError, match=f"in both training and test: {split.subjects[leaked]}"):
        split.check()
    with pytest.raises(BrainFMInputError, match="1 subject.*x_1"):
        check_disjoint({"a": ["x.1", "y"], "b": ["x_1"]})  # compared as the shard index spells them


def test_seen_subjects_are_read_off_the_model_folder(shard_index, tmp_path: Path):
    shards = shard_index(tmp_path / "shards", {"train": ("sub 01", "sub-02"), "val": ("sub-03",),
                                                     "test": ("sub-09",)})
    calibration = tmp_path / "calibration.csv"
    calibration.write_text("path,subject,split\na.nii.gz,sub-04,val\nb.nii.gz,sub-05,test\nc.nii.gz,sub-06,test\n"
                           "d.nii.gz,sub-07,\n")
    for name in ("a", "b", "d"):
        (tmp_path / f"{name}.nii.gz").touch()  # c has moved: its split cannot be trusted, so it counts as seen
    model = tmp_path / "model"
    model.mkdir()
    index = {"provenance": {"pretrain_config": {"data": {"shard_dir": str(shards), "train_split": "train",
                                                         "val_split": "val"}}},
             "calibration_info": {"source": str(calibration), "split": "val"}}
    (model / "model_index.json").write_text(json.dumps(index))
    seen = seen_subjects(model)
    assert {role: sorted(keys) for role, keys in seen.roles.items()} == {
        f"pretraining split 'train' of {shards}": ["sub-02", "sub_01"],
        f"pretraining split 'val' of {shards}": ["sub-03"],
        f"calibration split 'val' of {calibration}": ["sub-04", "sub-06", "sub-07"],
    }
    assert "sub 01" in seen and "sub-04" in seen and "sub-09" not in seen and "sub-05" not in seen
    assert seen_subjects(model, "disjoint").roles == {}
    # a model folder that does not say what it was trained on is refused, with the way out named
    (model / "model_index.json").write_text(json.dumps({"provenance": {}}))
    with pytest.raises(BrainFMInputError, match="no pretraining shards.*pretraining_subjects: disjoint"):
        seen_subjects(model)
    (model / "model_index.json").write_text(json.dumps({**index, "provenance": {"pretrain_config": {"data": {
        "shard_dir": str(tmp_path / "gone")}}}}))
    with pytest.raises(BrainFMInputError, match="cannot read the subjects.*no index.json"):
        seen_subjects(model)


def test_shard_keys_give_back_their_subject():
    for subject, row in (("sub-01", 2), ("site A/sub 7", 123456), ("x_12345", 9)):
        key = sample_key(ManifestRow(row=row, path=Path("a.nii.gz"), subject=subject, name="a"))
        assert subject_of_key(key) == subject.replace("/", "_").replace(" ", "_")


def test_seen_subjects_of_an_adapted_model_add_each_adaptation_part(shard_index, tmp_path: Path):
    """An adapted model was recalibrated (and its adapters trained) on its adaptation part: those subjects are
    seen; the held-out check part only measured a false-positive rate, and the calibration source it records
    ("site adaptation (...)") is no file to read."""
    shards = shard_index(tmp_path / "shards", {"train": ("sub-01",), "val": ("sub-02",)})
    model = tmp_path / "model"
    model.mkdir()
    previous = {"healthy_source": "old.csv", "split": {"adapt_subjects": ["old-1"], "check_subjects": ["old-2"]}}
    index = {"provenance": {"pretrain_config": {"data": {"shard_dir": str(shards)}}},
             "calibration_info": {"source": "site adaptation (3 healthy scans)", "split": "adapt"},
             "adaptation": {"healthy_source": "site.csv", "previous": previous,
                            "split": {"adapt_subjects": ["site 1", "site-2"], "check_subjects": ["site-3"]}}}
    (model / "model_index.json").write_text(json.dumps(index))
    seen = seen_subjects(model)
    assert {role: sorted(keys) for role, keys in seen.roles.items()} == {
        f"pretraining split 'train' of {shards}": ["sub-01"], f"pretraining split 'val' of {shards}": ["sub-02"],
        "site adaptation 1 on site.csv": ["site-2", "site_1"], "site adaptation 2 on old.csv": ["old-1"]}
    assert "site 1" in seen and "old-1" in seen and "site-3" not in seen and "old-2" not in seen
    # a calibration that is not the adaptation's names a source that must be readable
    index["calibration_info"] = {"source": str(tmp_path / "moved.csv"), "split": "val"}
    (model / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(BrainFMInputError, match="cannot read the subjects.*moved.csv"):
        seen_subjects(model)
