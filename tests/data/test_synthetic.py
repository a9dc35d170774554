"""Label-driven synthesis: real anatomies, SIMULATED subjects, contrasts and lesions (checked on generated scans)."""

from __future__ import annotations

import csv
import hashlib

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from brainfm.cli import main
from brainfm.data.synthetic import (
    HEALTHY_DATASET,
    LESION_DATASET,
    MANIFEST_COLUMNS,
    SYNTH_MODALITIES,
    TISSUES,
    SplitPlan,
    synthesize_cohort,
    synthesize_subject,
)
from brainfm.data.synthetic.contrast import SITES, TISSUE_INDEX, tissue_levels
from brainfm.io import BrainFMInputError

RES = 3  # mm: fast, and what the demo's grid uses


def _rows(manifest):
    with open(manifest, newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


def _pure(subject, *names, share=0.9):
    return subject.fractions[[TISSUE_INDEX[n] for n in names]].sum(0) > share


def _mean(image, where):
    assert where.sum() >= 5, "too few voxels to compare"
    return float(image[where].mean())


def _local_wm(subject, region, reach=4):
    """Pure white matter around a region (same bias field), not in it."""
    near = ndimage.binary_dilation(region, iterations=reach) & ~ndimage.binary_dilation(region, iterations=1)
    return near & _pure(subject, "wm")


@pytest.fixture(scope="module")
def healthy():
    """Three healthy subjects, all six contrasts, three anatomies and three different sites."""
    return [synthesize_subject(f"h{i}", (11, i), SYNTH_MODALITIES, anatomy=anatomy, resolution=RES)
            for i, anatomy in enumerate(("oasis", "icbm152", "mni152fsl"))]


@pytest.fixture(scope="module")
def lesioned():
    kinds = {"tumour": "icbm152", "metastasis": "oasis", "ms": "oasis", "stroke": "pydeface", "svd": "mni152fsl"}
    return {kind: synthesize_subject(kind, (12, i), SYNTH_MODALITIES, anatomy=anatomy, resolution=RES,
                                     lesion_kind=kind) for i, (kind, anatomy) in enumerate(kinds.items())}


def test_tissue_ordering_per_contrast(healthy):
    assert len({s.site for s in healthy}) == 3
    for s in healthy:
        wm, gm = _pure(s, "wm"), _pure(s, "cortical_gm", "deep_gm", share=0.8)
        bone, air = _pure(s, "skull"), _pure(s, "background")
        # CSF away from bone: thick slices mix the skull into the thin CSF layer under it (CT: +1000 HU)
        csf = _pure(s, "ventricles", "csf") & ~ndimage.binary_dilation(_pure(s, "skull", share=0.1), iterations=3)
        level = {m: {k: _mean(s.images[m], r) for k, r in
                     (("wm", wm), ("gm", gm), ("csf", csf), ("bone", bone), ("air", air))} for m in s.images}
        for m in ("T1", "T1CE"):
            assert level[m]["wm"] > 1.08 * level[m]["gm"] > 1.08 * level[m]["csf"], (s.site, m, level[m])
        assert level["T2"]["csf"] > 1.3 * level["T2"]["gm"] > 1.3 * level["T2"]["wm"], (s.site, level["T2"])
        flair = level["FLAIR"]
        assert flair["gm"] > 1.05 * flair["wm"] and flair["csf"] < 0.5 * flair["wm"], (s.site, flair)
        pd = level["PD"]
        assert pd["csf"] > 0.95 * pd["gm"] and pd["gm"] > 1.1 * pd["wm"], (s.site, pd)
        ct = level["CT"]
        assert ct["bone"] > 600 > ct["gm"] > ct["wm"] + 3 > ct["csf"] + 8 > -500 > ct["air"], (s.site, ct)
        assert abs(ct["wm"] - 26) < 8 and abs(ct["air"] + 1000) < 30
        for m in ("T1", "T2", "FLAIR", "PD"):  # MRI: skull and air dark, Rician noise keeps air above 0
            assert level[m]["bone"] < 0.5 * level[m]["wm"] and 0 < level[m]["air"] < 0.1 * level[m]["wm"]


def test_post_contrast_t1_enhances_vessels_dura_and_choroid_plexus_only(healthy):
    s = healthy[0]
    enhancing = _pure(s, "dura_vessels", "choroid_plexus", share=0.5)
    ratio = s.images["T1CE"] / np.maximum(s.images["T1"], 1e-3)
    wm = _pure(s, "wm")
    assert np.median(ratio[enhancing]) > 1.5 * np.median(ratio[wm])
    assert abs(np.median(ratio[wm]) - 1.0) < 0.1  # same site, same sequence: brain unchanged


def test_the_signal_equations_order_tissues_at_every_site():
    t = TISSUE_INDEX
    for site in SITES.values():
        for seed in range(3):
            rng = np.random.default_rng(seed)
            t1, t2, flair, pd = (tissue_levels(m, site, rng) for m in ("T1", "T2", "FLAIR", "PD"))
            assert t1[t["wm"]] > t1[t["cortical_gm"]] > t1[t["csf"]], site.name
            assert t2[t["csf"]] > t2[t["cortical_gm"]] > t2[t["wm"]], site.name
            assert flair[t["cortical_gm"]] > flair[t["wm"]] > 5 * flair[t["csf"]], site.name
            assert pd[t["csf"]] >= 0.95 * pd[t["cortical_gm"]] > pd[t["wm"]], site.name


def test_lesions_look_as_they_do_in_each_contrast(lesioned):
    tumour = lesioned["tumour"]
    oedema, rim = _pure(tumour, "oedema", share=0.7), _pure(tumour, "enhancing", share=0.7)
    wm = _local_wm(tumour, _pure(tumour, *("necrosis", "enhancing", "oedema"), share=0.2), reach=3)
    for modality, brighter in (("T2", True), ("FLAIR", True), ("PD", True), ("T1", False), ("CT", False)):
        ratio = _mean(tumour.images[modality], oedema) / _mean(tumour.images[modality], wm)
        assert (ratio > 1.15) if brighter else (ratio < 0.92), (modality, ratio)
    assert _mean(tumour.images["T1CE"], rim) > 1.4 * _mean(tumour.images["T1CE"], wm)
    assert _mean(tumour.images["T1"], rim) < _mean(tumour.images["T1"], wm)  # enhancement, not T1 shortening
    metastasis = lesioned["metastasis"]
    nodules = _pure(metastasis, "enhancing", share=0.5)
    assert _mean(metastasis.images["T1CE"], nodules) > 1.4 * _mean(metastasis.images["T1CE"],
                                                                 _local_wm(metastasis, nodules))
    for kind, tissue in (("ms", "ms_plaque"), ("stroke", "infarct"), ("svd", "wmh")):
        s = lesioned[kind]
        lesion = _pure(s, tissue, share=0.5)
        wm = _local_wm(s, lesion)
        assert _mean(s.images["FLAIR"], lesion) > 1.2 * _mean(s.images["FLAIR"], wm), kind
        assert _mean(s.images["T2"], lesion) > 1.3 * _mean(s.images["T2"], wm), kind
        assert _mean(s.images["T1"], lesion) < 0.95 * _mean(s.images["T1"], wm), kind
    stroke = lesioned["stroke"]
    infarct = _pure(stroke, "infarct", share=0.5)
    assert _mean(stroke.images["CT"], infarct) < _mean(stroke.images["CT"], _local_wm(stroke, infarct)) - 5


def test_lesion_label_is_the_lesion_tissue_and_the_same_for_every_contrast(lesioned):
    for kind, s in lesioned.items():
        lesion_share = s.fractions[[TISSUE_INDEX[n] for n in TISSUES[-6:]]].sum(0)
        assert np.array_equal(s.label.astype(bool), (lesion_share >= 0.5) & (s.mask > 0)), kind
        assert s.lesion_type == kind and s.lesion_volume_ml == pytest.approx(s.label.sum() * RES**3 / 1000)
        assert 0.2 < s.lesion_volume_ml < 250, (kind, s.lesion_volume_ml)


def test_contrasts_share_geometry_and_streams_are_independent():
    both = synthesize_subject("a", 3, ("T1", "FLAIR"), anatomy="oasis", resolution=RES, lesion_kind="ms")
    one = synthesize_subject("a", 3, ("FLAIR",), anatomy="oasis", resolution=RES, lesion_kind="ms")
    again = synthesize_subject("a", 3, ("T1", "FLAIR"), anatomy="oasis", resolution=RES, lesion_kind="ms")
    assert np.array_equal(both.labels, one.labels) and np.array_equal(both.mask, one.mask)
    assert np.array_equal(both.label, one.label)
    assert np.array_equal(both.images["FLAIR"], one.images["FLAIR"])  # adding T1 changes nothing else
    for m in ("T1", "FLAIR"):
        assert np.array_equal(both.images[m], again.images[m])
    other = synthesize_subject("a", 4, ("T1",), anatomy="oasis", resolution=RES)
    assert (other.labels != both.labels).mean() > 0.05


def test_a_lesion_changes_only_its_label_except_for_a_tumours_mass_effect():
    healthy = synthesize_subject("s", 8, ("FLAIR",), anatomy="oasis", resolution=RES)
    ms = synthesize_subject("s", 8, ("FLAIR",), anatomy="oasis", resolution=RES, lesion_kind="ms")
    lesion_share = ms.fractions[[TISSUE_INDEX[n] for n in TISSUES[-6:]]].sum(0)
    untouched = lesion_share == 0
    assert np.array_equal(healthy.fractions[:, untouched], ms.fractions[:, untouched])
    assert (lesion_share > 0).sum() < 3 * (ms.label > 0).sum() + 100  # soft edges, not a spread
    far = ~ndimage.binary_dilation(lesion_share > 0, iterations=8)  # beyond blur and 6 mm slices
    assert np.array_equal(healthy.images["FLAIR"][far], ms.images["FLAIR"][far])
    assert healthy.age == ms.age and healthy.site == ms.site
    tumour = synthesize_subject("s", 8, ("FLAIR",), anatomy="oasis", resolution=RES, lesion_kind="tumour")
    beyond = ~ndimage.binary_dilation(tumour.label > 0, iterations=2) & (tumour.mask > 0)
    assert (healthy.labels[beyond] != tumour.labels[beyond]).sum() > 50  # tissue pushed aside


def test_subjects_differ_from_their_anatomy_and_each_other():
    from brainfm.data.anatomies import load_anatomy

    source = load_anatomy("oasis", RES)
    a = synthesize_subject("x", 1, ("T1",), anatomy="oasis", resolution=RES)
    b = synthesize_subject("y", 2, ("T1",), anatomy="oasis", resolution=RES)
    source_labels = np.asarray(source.labels)
    for s in (a, b):
        assert (s.labels != source_labels).mean() > 0.05
        assert 0.8 < s.mask.sum() / source.mask.sum() < 1.3  # size +-7 % per axis, ventricles growing
    ventricles = [int((s.labels == TISSUE_INDEX["ventricles"]).sum()) for s in (a, b)]
    assert ventricles[0] != ventricles[1]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    splits = {"train": SplitPlan(n_healthy=2, anatomies=("icbm152", "oasis")),
              "val": SplitPlan(n_healthy=1, anatomies=("mni152fsl",)),
              "test": SplitPlan(n_healthy=1, n_lesion=2, anatomies=("pydeface",))}
    manifest = synthesize_cohort(out, splits, protocols=[("T1", "FLAIR"), ("CT",)], lesion_kinds=("tumour", "ms"),
                                 held_out_anatomies=("pydeface",), seed=3, resolution=RES)
    return out, manifest


def test_cohort_manifest_splits_by_subject_and_holds_the_test_anatomy_out(cohort):
    out, manifest = cohort
    columns, rows = _rows(manifest)
    assert tuple(columns) == MANIFEST_COLUMNS
    # protocols cycle per split and group: subject 0 gets T1+FLAIR (2 rows), subject 1 CT (1 row)
    assert len(rows) == (2 + 1) + 2 + 2 + (2 + 1)
    by_subject: dict[str, list[dict]] = {}
    for row in rows:
        by_subject.setdefault(row["subject"], []).append(row)
        assert (out / row["path"]).is_file() and (out / row["mask"]).is_file()
    for subject_rows in by_subject.values():
        assert len({(r["split"], r["anatomy"], r["mask"], r["label"], r["age"], r["site"]) for r in
                    subject_rows}) == 1
    assert {r["anatomy"] for r in rows if r["split"] in ("train", "val")} == {"icbm152", "oasis", "mni152fsl"}
    assert {r["anatomy"] for r in rows if r["split"] == "test"} == {"pydeface"}
    lesion = [r for r in rows if r["label"]]
    assert {r["lesion_type"] for r in lesion} == {"tumour", "ms"} and all(r["split"] == "test" for r in lesion)
    assert {r["dataset"] for r in lesion} == {LESION_DATASET}
    assert {r["dataset"] for r in rows if not r["label"]} == {HEALTHY_DATASET}
    assert {r["modality"] for r in rows} == {"T1", "FLAIR", "CT"}


def test_cohort_files_are_int16_scans_on_the_anatomy_grid_with_labels_in_the_mask(cohort):
    out, manifest = cohort
    _, rows = _rows(manifest)
    for row in rows:
        image = nib.load(out / row["path"])
        assert image.get_data_dtype() == np.int16 and np.allclose(np.diag(image.affine)[:3], RES)
        data = np.asarray(image.dataobj)
        if row["modality"] == "CT":
            assert data.min() <= -990 and data.max() > 700
        else:
            assert data.min() >= 0
        if row["label"]:
            label = np.asarray(nib.load(out / row["label"]).dataobj)
            mask = np.asarray(nib.load(out / row["mask"]).dataobj)
            assert label.sum() > 0 and not (label & ~mask.astype(bool)).any()
            assert float(row["lesion_volume_ml"]) == pytest.approx(label.sum() * RES**3 / 1000, abs=1e-3)


def test_cohort_is_byte_for_byte_reproducible_with_any_workers_and_cli_writes_it(tmp_path):
    args = ["data", "synth", "--subjects", "1", "--lesion-subjects", "1", "--anatomies", "oasis",
            "--test-anatomies", "icbm152", "--protocol", "T1,T2", "--lesion-kinds", "stroke", "--resolution", "3",
            "--seed", "5"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--workers", "2"]) == 0  # processes change nothing
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 1 + 2 * 2 + 2 + 1  # manifest, 4 scans, 2 masks, 1 label
    for name in files:
        digest = [hashlib.sha256((tmp_path / d / name).read_bytes()).hexdigest() for d in ("a", "b")]
        assert digest[0] == digest[1], name
    _, rows = _rows(tmp_path / "a" / "manifest.csv")
    assert {(r["split"], r["anatomy"]) for r in rows} == {("", "oasis"), ("test", "icbm152")}


def test_bad_arguments_are_refused(tmp_path, capsys):
    plan = {"": SplitPlan(n_healthy=1)}
    with pytest.raises(ValueError, match="held-out"):
        synthesize_cohort(tmp_path / "a", {"train": SplitPlan(1, anatomies=("oasis",))},
                          held_out_anatomies=("oasis",))
    with pytest.raises(ValueError, match="unknown anatomies"):
        synthesize_cohort(tmp_path / "b", {"": SplitPlan(1, anatomies=("colin27",))})
    with pytest.raises(ValueError, match="protocols"):
        synthesize_cohort(tmp_path / "c", plan, protocols=[("T1", "DWI")])
    with pytest.raises(ValueError, match="lesion_kinds"):
        synthesize_cohort(tmp_path / "d", {"": SplitPlan(0, 1)}, lesion_kinds=("cyst",))
    with pytest.raises(ValueError, match="at least one subject"):
        synthesize_cohort(tmp_path / "e", {"": SplitPlan()})
    (tmp_path / "file").write_text("x")
    with pytest.raises(BrainFMInputError, match="not a folder"):
        synthesize_cohort(tmp_path / "file", plan)
    assert main(["data", "synth", "--out", str(tmp_path / "f"), "--anatomies", "colin27"]) == 2
    assert "unknown anatomies" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()
