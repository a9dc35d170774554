"""Shard writer: round trip, subject-level splits, rejections, CLI exit code, crash + resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainfm.config import DataConfig, load_config
from brainfm.data import shards as shards_mod
from brainfm.data.shards import build_shards, make_dataloader, read_manifest, verify_shards
from brainfm.io import BrainFMInputError

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "data" / "tiny.yaml"
EXPECTED_REASONS = {
    "missing.nii.gz": "missing_file",
    "fourd.nii.gz": "not_3d",
    "nan.nii.gz": "non_finite",
    "garbage.nii.gz": "unreadable",
    "zeros.nii.gz": "empty_brain",
}
_CACHE: dict[str, dict] = {}


def tiny_config() -> DataConfig:
    config = load_config(CONFIG, DataConfig)
    config.shards.max_samples_per_shard = 1  # one scan per shard: several shards from a handful of scans
    config.shards.workers = 2
    return config


def write_cohort(root: Path) -> Path:
    """Four good scans from the real ICBM152 template (shifted grid, smooth bias, one with a simulated
    hypointense lesion and its label) and one row per kind of bad input."""
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    root.mkdir(parents=True, exist_ok=True)
    template = load_mni152_template(resolution=2)
    data = template.get_fdata().astype(np.float32)
    brain = load_mni152_brain_mask(resolution=2).get_fdata() > 0.5
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in data.shape], indexing="ij"))
    rows = ["path,subject,modality,age,sex,site,split,mask,label,lesion_type"]
    good = [("a1", "sub-a", ""), ("a2", "sub-a", ""), ("b", "sub-b", "train"), ("c", "sub/c", "train")]
    for i, (name, subject, split) in enumerate(good):
        rng = np.random.default_rng(i)
        affine = template.affine.copy()
        affine[:3, 3] += (2.0 * i, -2.0 * i, 2.0)
        image = data * (1.0 + 0.1 * grid[i % 3]) + rng.normal(0, 0.005, data.shape).astype(np.float32) * brain
        label_cell, lesion = "", "none"
        if name == "b":
            centre = np.array([62, 70, 52])
            lesion_mask = (np.linalg.norm(np.indices(data.shape) - centre[:, None, None, None], axis=0) < 5) & brain
            image[lesion_mask] *= 0.4
            nib.save(nib.Nifti1Image(lesion_mask.astype(np.uint8), affine), root / "b_label.nii.gz")
            label_cell, lesion = "b_label.nii.gz", "sphere"
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), root / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(brain.astype(np.uint8), affine), root / f"{name}_mask.nii.gz")
        rows.append(f"{name}.nii.gz,{subject},T1,{30 + i},F,site1,{split},{name}_mask.nii.gz,{label_cell},{lesion}")
    nib.save(nib.Nifti1Image(np.stack([data, data], -1), template.affine), root / "fourd.nii.gz")
    nan = data.copy()
    nan[40, 50, 40] = np.nan
    nib.save(nib.Nifti1Image(nan, template.affine), root / "nan.nii.gz")
    (root / "garbage.nii.gz").write_bytes(b"\x1f\x8b this is not a gzip stream" * 10)
    nib.save(nib.Nifti1Image(np.zeros_like(data), template.affine), root / "zeros.nii.gz")
    for name in EXPECTED_REASONS:
        rows.append(f"{name},bad-{name.split('.')[0]},T1,,,,test,,,")
    rows.append("b.nii.gz,bad-modality,XR,,,,test,,,")
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def built_shard_set(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Build once per session (preprocessing with registration dominates the data tests' runtime)."""
    if "set" not in _CACHE:
        root = tmp_path_factory.mktemp("cohort")
        manifest = write_cohort(root)
        config = tiny_config()
        report = build_shards(manifest, root / "shards", config, workers=2)
        _CACHE["set"] = {"root": root, "manifest": manifest, "out": root / "shards", "config": config,
                         "report": report}
    return _CACHE["set"]


@pytest.fixture(scope="session")
def shard_set(tmp_path_factory):
    return built_shard_set(tmp_path_factory)


def _read_all_3d(out: Path, split: str) -> dict[str, dict]:
    samples = {}
    for batch in make_dataloader(out, split, mode="3d", batch_size=1, seed=0, drop_last=False):
        meta = batch["meta"][0]
        samples[meta["subject"] + "/" + Path(meta["source_path"]).name] = batch
    return samples


def test_round_trip_equals_preprocess_output(shard_set):
    from brainfm.data.anatomy import compute_anatomy
    from brainfm.data.preprocess import preprocess_scan

    root, config = shard_set["root"], shard_set["config"]
    batch = _read_all_3d(shard_set["out"], "train")["sub-b/b.nii.gz"]
    scan = preprocess_scan(root / "b.nii.gz", "T1", config.preprocess, mask_path=root / "b_mask.nii.gz",
                           label_path=root / "b_label.nii.gz")
    anatomy = compute_anatomy(scan, config.preprocess)
    assert batch["image"].shape == (1, 1, 40, 48, 40) and batch["anatomy"].shape == (1, 2, 40, 48, 40)
    np.testing.assert_allclose(batch["image"][0, 0].numpy(), scan.image, atol=5e-4)
    np.testing.assert_array_equal(batch["mask"][0, 0].numpy(), scan.mask)
    np.testing.assert_array_equal(batch["label"][0, 0].numpy(), scan.label)
    assert scan.label.sum() > 0
    np.testing.assert_allclose(batch["anatomy"][0].numpy(), anatomy.priors, atol=1e-3)
    meta = batch["meta"][0]
    assert meta["split"] == "train" and meta["age"] == 32.0 and meta["sex"] == "F" and meta["site"] == "site1"
    assert meta["lesion_type"] == "sphere" and meta["modality"] == "T1" and meta["has_label"] is True
    assert meta["key"] == "sub-b_00002"
    np.testing.assert_allclose(meta["grid_affine"], scan.affine)
    assert tuple(meta["source_shape"]) == scan.source_shape
    assert meta["scalars"]["brain_volume_ml"] == pytest.approx(anatomy.scalars["brain_volume_ml"])


def test_index_counts_sha256_and_verify(shard_set, tmp_path):
    from brainfm.data.preprocess import recipe_dict

    out, report = shard_set["out"], shard_set["report"]
    index = json.loads((out / "index.json").read_text())
    assert report.n_accepted == 4 and sum(report.counts.values()) == 4
    assert index["recipe"] == recipe_dict(shard_set["config"].preprocess)
    for split, shards in index["splits"].items():
        assert index["counts"][split]["n_samples"] == sum(len(s["keys"]) for s in shards)
        for number, shard in enumerate(shards):
            assert shard["name"] == f"{split}-{number:06d}.tar" and shard["n_samples"] == 1
            assert len(shard["slice_brain_voxels"][0]) == 40
    assert index["counts"]["train"]["n_subjects"] >= 2
    assert verify_shards(out) == []
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    victim = copy / index["splits"]["train"][0]["name"]
    raw = bytearray(victim.read_bytes())
    raw[2000] ^= 0xFF
    victim.write_bytes(bytes(raw))
    assert verify_shards(copy) == [f"{victim}: sha256 mismatch (corrupt or modified)"]


def test_splits_are_by_subject_and_deterministic(tmp_path):
    rows = ["path,subject,split"]
    for s in range(150):
        for scan in range(2):
            (tmp_path / f"s{s}_{scan}.nii.gz").touch()
            rows.append(f"s{s}_{scan}.nii.gz,subj{s},{'val' if s == 7 and scan == 1 else ''}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    config = tiny_config()
    entries, rejected = read_manifest(tmp_path / "m.csv", config)
    assert not rejected and len(entries) == 300
    by_subject: dict[str, set[str]] = {}
    for entry in entries:
        by_subject.setdefault(entry.subject, set()).add(entry.split)
    assert all(len(splits) == 1 for splits in by_subject.values())  # no subject in two splits
    assert by_subject["subj7"] == {"val"}  # the explicit split wins for all of the subject's scans
    fractions = {k: sum(s == {k} for s in by_subject.values()) / 150 for k in ("train", "val", "test")}
    assert 0.45 < fractions["train"] < 0.75 and 0.1 < fractions["val"] < 0.33 and 0.1 < fractions["test"] < 0.33
    assert [e.split for e in read_manifest(tmp_path / "m.csv", config)[0]] == [e.split for e in entries]
    config.shards.seed = 1
    assert [e.split for e in read_manifest(tmp_path / "m.csv", config)[0]] != [e.split for e in entries]
    (tmp_path / "bad.csv").write_text("path,subject,split\ns0_0.nii.gz,x,train\ns0_1.nii.gz,x,test\n")
    with pytest.raises(BrainFMInputError, match="subject 'x' is listed in splits"):
        read_manifest(tmp_path / "bad.csv", config)


def test_subject_with_two_scans_stays_in_one_split(shard_set):
    index = json.loads((shard_set["out"] / "index.json").read_text())
    splits_of_a = {split for split, shards in index["splits"].items() for s in shards for k in s["keys"]
                   if k.startswith("sub-a_")}
    assert len(splits_of_a) == 1
    assert sum(k.startswith("sub-a_") for shards in index["splits"].values() for s in shards for k in s["keys"]) == 2


def test_each_bad_input_is_rejected_with_its_reason(shard_set):
    out, root = shard_set["out"], shard_set["root"]
    records = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    reasons = {(Path(r["path"]).name, r["subject"]): r["reason"] for r in records}
    for name, reason in EXPECTED_REASONS.items():
        assert reasons[(name, f"bad-{name.split('.')[0]}")] == reason
    assert reasons[("b.nii.gz", "bad-modality")] == "bad_modality"
    assert len(records) == len(EXPECTED_REASONS) + 1 == shard_set["report"].n_rejected
    assert all("\n" not in r["message"] and str(root) in r["message"] for r in records)
    assert not any(shard["name"].startswith("test") for shard in
                   json.loads((out / "index.json").read_text())["splits"].get("test", []))


def test_cli_exits_nonzero_when_nothing_is_accepted(shard_set, tmp_path, capsys):
    from brainfm.cli import main

    root = shard_set["root"]
    (tmp_path / "m.csv").write_text(f"path,modality\n{root / 'nan.nii.gz'},T1\n{root / 'nothere.nii.gz'},T1\n")
    assert main(["data", "shards", "--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "out"),
                 "--config", str(CONFIG), "--workers", "1"]) == 1
    assert "accepted 0 scan(s)" in capsys.readouterr().out
    assert len((tmp_path / "out" / "rejected.jsonl").read_text().splitlines()) == 2
    assert not list((tmp_path / "out").glob("*.tar"))


def test_crash_midway_then_resume_keeps_finished_shards(shard_set, tmp_path, monkeypatch):
    out = tmp_path / "shards"
    shutil.copytree(shard_set["out"], out)
    original = json.loads((out / "index.json").read_text())
    names = [s["name"] for shards in original["splits"].values() for s in shards]
    lost = names[-2:]  # as if the first run died before writing these two shards
    for name in lost:
        (out / name).unlink()
        (out / ".build" / f"{name}.json").unlink()
    (out / "index.json").unlink()
    leftover = out / f".{lost[0]}.x1y2.tmp.tar"
    leftover.write_bytes(b"partial tar from a killed run")
    kept = {n: ((out / n).stat().st_ino, (out / n).stat().st_mtime_ns) for n in names if n not in lost}

    real_encode = shards_mod.encode_sample
    calls = []

    def crash_on_second(entry, recipe):
        calls.append(entry.key)
        if len(calls) == 2:
            raise RuntimeError("simulated crash while writing a shard")
        return real_encode(entry, recipe)

    monkeypatch.setattr(shards_mod, "encode_sample", crash_on_second)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_shards(shard_set["manifest"], out, shard_set["config"], workers=1)
    assert (out / lost[0]).is_file() and not (out / lost[1]).exists()
    assert not [p for p in out.iterdir() if ".tmp" in p.name]  # the crash left no partial tar, the old one is gone
    monkeypatch.setattr(shards_mod, "encode_sample", real_encode)

    stamp_first = ((out / lost[0]).stat().st_ino, (out / lost[0]).stat().st_mtime_ns)
    report = build_shards(shard_set["manifest"], out, shard_set["config"], workers=1)
    assert report.shards_built == 1 and report.shards_kept == len(names) - 1 and report.n_accepted == 4
    for name, stamp in kept.items():
        assert ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == stamp
    assert ((out / lost[0]).stat().st_ino, (out / lost[0]).stat().st_mtime_ns) == stamp_first
    resumed = json.loads((out / "index.json").read_text())
    # 2 workers at first, 1 worker now: byte-identical shards
    assert resumed["splits"] == original["splits"]
    assert verify_shards(out) == []
    assert (out / "rejected.jsonl").read_text() == (shard_set["out"] / "rejected.jsonl").read_text()
