"""``brainfm adapt`` at tiny size: a model calibrated elsewhere meets a site it never saw (SIMULATED subjects on
pydeface's real head anatomy), is recalibrated (after a few LoRA steps) on some of the site's healthy subjects and
checked on the others. The networks are untrained: what is tested is the method's plumbing — the split by subject,
the false-positive rate before and after on held-out subjects, the recorded provenance, the adapters travelling
with the model folder, skipped and refused inputs, resuming — not detection quality (the demo measures that)."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from brainfm.cli import main
from brainfm.data.synthetic import SplitPlan, synthesize_cohort
from brainfm.pipeline import BrainFMPipeline


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict:
    """Five healthy subjects and one with a SIMULATED tumour, from an anatomy the model never saw; a healthy
    manifest with three bad rows (a missing file, a file that is not a scan, a labelled scan) and an eval one."""
    root = tmp_path_factory.mktemp("site")
    manifest = synthesize_cohort(root, {"": SplitPlan(n_healthy=5, anatomies=("pydeface",)),
                                        "test": SplitPlan(n_lesion=1, anatomies=("pydeface",))},
                                 lesion_kinds=("tumour",), seed=5, resolution=3)
    with manifest.open() as fh:
        rows = list(csv.DictReader(fh))
    healthy = [r for r in rows if not r["label"]]
    lesion = [r for r in rows if r["label"]]
    (root / "images" / "broken_T1.nii.gz").write_bytes(b"not a NIfTI file")
    bad = [dict(healthy[0], path="images/missing_T1.nii.gz", subject="missing"),
           dict(healthy[0], path="images/broken_T1.nii.gz", subject="broken")]

    def write(name: str, members: list[dict]) -> Path:
        with (root / name).open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(members)
        return root / name

    return {"root": root, "healthy": healthy, "manifest": write("healthy.csv", healthy + bad + lesion),
            "few": write("few.csv", healthy[:2]), "ct": write("ct.csv", [dict(r, modality="CT") for r in healthy]),
            "eval": write("eval.csv", lesion)}


@pytest.fixture(scope="module")
def model_dir(tiny_model_folder, tmp_path_factory) -> Path:
    """The shared tiny model (its calibration fitted on other data than the site's), with the UNet's output layer
    randomised: MONAI zero-initialises it, and an untrained UNet with a zero output gives LoRA no gradient."""
    pipeline = BrainFMPipeline.from_pretrained(tiny_model_folder["model_dir"])
    generator = torch.Generator().manual_seed(3)
    for name, parameter in pipeline.unet.named_parameters():
        if name.startswith("unet.out."):
            parameter.data = 0.1 * torch.randn(parameter.shape, generator=generator)
    return pipeline.save_pretrained(tmp_path_factory.mktemp("foundation") / "model")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_adapt_lowers_false_positives_on_held_out_subjects_and_records_its_provenance(model_dir, site, tmp_path,
                                                                                      capsys):
    out, run = tmp_path / "adapted", tmp_path / "run"

    def command(target: Path, *extra: str) -> list[str]:
        return ["adapt", "--model", str(model_dir), "--healthy", str(site["manifest"]), "--out", str(target),
                "--steps", "2", "--lora-rank", "2", "--run-dir", str(run), "--set", "data.batch_size=4",
                "--set", "optim.lr=0.01", "--set", "optim.warmup_steps=0", *extra]

    assert main(command(out, "--eval", str(site["eval"]))) == 0
    captured = capsys.readouterr()
    skipped = [line for line in captured.err.splitlines() if line.startswith("brainfm: skipped:")]
    assert len(skipped) == 3  # listed, one line each, and the adaptation went on without them
    assert any("missing_T1" in line for line in skipped) and any("broken_T1" in line for line in skipped)
    assert any("lesion label" in line for line in skipped)

    adapted = BrainFMPipeline.from_pretrained(out)
    record = adapted.config.adaptation
    # split by subject: the check subjects were never adapted on, and every usable scan is in one part
    adapt_part, check_part = record["scans"]["adapt"], record["scans"]["check"]
    assert {s["subject"] for s in adapt_part}.isdisjoint({s["subject"] for s in check_part})
    assert len(adapt_part) == 3 and len(check_part) == 2
    by_name = {r["subject"]: site["root"] / r["path"] for r in site["healthy"]}
    assert {s["name"] for s in adapt_part + check_part} == set(by_name)
    for scan in adapt_part + check_part:
        assert scan["sha256"] == _sha256(by_name[scan["name"]])
    assert record["threshold_fit"] == "leave_one_out"  # three adaptation scans: each scored against the other two
    assert adapted.config.calibration_info["threshold_fit"] == "leave_one_out"
    assert adapted.calibration.n_scans == 3 and record["split"]["check_subjects"] == sorted(
        s["subject"] for s in check_part)
    # the false-positive rate was measured on the held-out subjects, before and after
    fp = record["healthy_fp_rate"]
    assert set(fp["before_per_scan"]) == set(fp["after_per_scan"]) == {s["name"] for s in check_part}
    assert fp["after"] <= fp["before"]
    assert f"before {fp['before']:.4f}, after {fp['after']:.4f}" in captured.out
    assert record["steps"] == 2 and record["lora_rank"] == 2 and record["lora"] is True
    assert record["target_fpr"] == BrainFMPipeline.from_pretrained(model_dir).calibration.config.target_fpr
    assert set(record["evaluation"]["before"]) == set(record["evaluation"]["after"])
    assert record["evaluation"]["after"]["overall/dice_pooled"] is not None
    after_eval = json.loads((run / "eval-after" / "metrics.json").read_text())["ldm"]
    for kind, section in after_eval["by_lesion_type"].items():  # per lesion kind beside the pooled numbers
        assert record["evaluation"]["after"][f"by_lesion_type/{kind}/lesion_sensitivity"] == section[
            "lesion_sensitivity"]
    assert json.loads((run / "adaptation.json").read_text()) == json.loads(json.dumps(record))

    # the adapters travel beside the untouched foundation weights, and the loaded UNet carries them
    assert _sha256(out / "unet" / "diffusion_pytorch_model.safetensors") == _sha256(
        model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert (out / "unet_lora" / "adapter_model.safetensors").is_file()
    foundation = BrainFMPipeline.from_pretrained(model_dir)
    changed = [not torch.equal(a, b) for a, b in zip(adapted.unet.parameters(), foundation.unet.parameters(),
                                                     strict=True)]
    assert any(changed) and not any("lora" in k for k in adapted.unet.state_dict())

    # the model card shows the adaptation and every scan's sha256
    assert main(["release", "--model", str(out), "--out", str(tmp_path / "release"),
                 "--metrics", str(run / "eval-after" / "metrics.json")]) == 0
    card = (tmp_path / "release" / "README.md").read_text(encoding="utf-8")
    assert "## Site adaptation" in card and f"before {fp['before']:.4f}, after {fp['after']:.4f}" in card
    assert all(scan["sha256"] in card for scan in adapt_part + check_part)

    # resumable: the same run folder continues from its last checkpoint (nothing retrained, same adapters)
    losses = (run / "train" / "logs" / "losses.jsonl").read_text()
    assert main(command(tmp_path / "again", "--resume", "auto")) == 0
    assert (run / "train" / "logs" / "losses.jsonl").read_text() == losses
    assert _sha256(tmp_path / "again" / "unet_lora" / "adapter_model.safetensors") == _sha256(
        out / "unet_lora" / "adapter_model.safetensors")
    capsys.readouterr()
    assert main(command(tmp_path / "fresh")) == 2  # a fresh start over the run's checkpoints is refused
    assert "--resume auto" in capsys.readouterr().err


@pytest.mark.parametrize(("healthy", "evaluate", "message"), [
    ("few", None, "needs at least 3 usable healthy scans, found 2"),
    ("ct", None, "modality CT is not one this model knows (T1)"),
    ("manifest", "manifest", "the model is adapted on; leave it out of the evaluation"),
])
def test_adapt_refuses_in_one_line(model_dir, site, tmp_path, capsys, healthy, evaluate, message):
    out = tmp_path / "adapted"
    extra = [] if evaluate is None else ["--eval", str(site[evaluate])]
    assert main(["adapt", "--model", str(model_dir), "--healthy", str(site[healthy]), "--out", str(out),
                 *extra]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("brainfm: error: ") and message in error and not out.exists()


def test_split_is_by_subject_seeded_and_keeps_two_scans_to_adapt_on():
    from brainfm.anomaly.adapt import split_by_subject
    from brainfm.io import BrainFMInputError

    def scan(subject: str, i: int) -> SimpleNamespace:
        return SimpleNamespace(subject=subject, name=f"{subject}_{i}")

    scans = [scan(f"sub-{s}", i) for s in range(5) for i in range(2)]  # two contrasts per subject
    adapt, check = split_by_subject(scans, 0.4, seed=0)
    assert len({s.subject for s in check}) == 2 and len(adapt) == 6  # a subject's scans stay together
    assert {s.subject for s in adapt}.isdisjoint({s.subject for s in check})
    assert [s.name for s in split_by_subject(scans, 0.4, seed=0)[1]] == [s.name for s in check]  # seeded
    assert len({frozenset(s.subject for s in split_by_subject(scans, 0.4, seed=k)[1]) for k in range(6)}) > 1
    for seed in range(6):  # whichever subject comes first, the check part never leaves fewer than 2 scans
        adapt, check = split_by_subject([scan("a", 0), scan("b", 0), scan("b", 1)], 0.4, seed=seed)
        assert [s.name for s in check] == ["a_0"] and len(adapt) == 2
    with pytest.raises(BrainFMInputError, match="fewer than 2 scans"):
        split_by_subject([scan("a", 0), scan("a", 1), scan("a", 2)], 0.4, seed=0)


def test_leave_one_out_threshold_holds_the_target_on_new_subjects_where_in_sample_does_not():
    """Five healthy subjects whose residuals share a subject-level smooth pattern (what a site's scans look like):
    a threshold set on the scans the statistics were fitted on is too low for a new subject (each scan pulls the
    voxelwise mean towards itself); scoring each against the other four's statistics restores the target."""
    import numpy as np
    from scipy import ndimage

    from brainfm.anomaly.deviation import eroded_mask, postprocess
    from brainfm.anomaly.normative import NormativeCalibration
    from brainfm.config import DeviationConfig

    rng = np.random.default_rng(0)
    shape = (24, 24, 24)
    mask = np.zeros(shape, bool)
    mask[3:-3, 3:-3, 3:-3] = True

    def subject() -> np.ndarray:
        return rng.normal(size=shape) + 8 * ndimage.gaussian_filter(rng.normal(size=shape), 3)

    adapt, new = [subject() for _ in range(5)], [subject() for _ in range(20)]
    config = DeviationConfig()
    fits = {loo: NormativeCalibration.fit(adapt, [mask] * 5, config, leave_one_out=loo) for loo in (False, True)}
    kept = eroded_mask(mask, config.mask_erosion_vox)
    fp = {loo: float(np.mean([np.mean(postprocess(c.zmap(r, mask), mask, config)[kept] > c.threshold) for r in new]))
          for loo, c in fits.items()}
    assert config.target_fpr == 0.01 and fp[False] > 0.03 and fp[True] < 0.02  # measured 0.033 and 0.017
    assert fits[True].threshold > fits[False].threshold
    np.testing.assert_array_equal(fits[True].mean_map, fits[False].mean_map)  # the statistics: all five scans
    np.testing.assert_array_equal(fits[True].std_map, fits[False].std_map)
    with pytest.raises(ValueError, match="at least 3 healthy scans"):
        NormativeCalibration.fit(adapt[:2], [mask] * 2, config, leave_one_out=True)


def test_site_rows_takes_one_split_of_a_manifest(site):
    from brainfm.anomaly.adapt import site_rows
    from brainfm.io import BrainFMInputError

    rows, _ = site_rows(site["root"] / "manifest.csv", split="test")
    assert [r.label is not None for r in rows] == [True]  # the one lesion subject, not the five healthy ones
    assert len(site_rows(site["root"] / "manifest.csv")[0]) == 6
    with pytest.raises(BrainFMInputError, match="no row of split 'adapt'"):
        site_rows(site["root"] / "manifest.csv", split="adapt")
    with pytest.raises(BrainFMInputError, match="only be chosen in a manifest"):
        site_rows(site["root"] / "images", split="test")
