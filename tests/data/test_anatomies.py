"""Real anatomy sources that install offline: pinned and hashed files, label maps, derived masks and their accuracy.

The derived maps are cached on disk after the first derivation (``brainfm data anatomies`` in the install step
warms that cache), so these tests read them in about a second each.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from brainfm.data import anatomies
from brainfm.data.anatomies import (
    BRAINSTEM,
    CEREBELLAR_GM,
    CEREBELLAR_WM,
    CORTICAL_GM,
    CSF,
    DEEP_GM,
    FOV_MM,
    LABEL_NAMES,
    SKULL,
    SOFT_TISSUE,
    SOURCES,
    VENTRICLES,
    WM,
    dice,
    load_anatomy,
    source_file,
)
from brainfm.io import BrainFMInputError

REQUIRED = (SOFT_TISSUE, SKULL, CSF, VENTRICLES, CORTICAL_GM, DEEP_GM, WM, CEREBELLAR_GM, CEREBELLAR_WM, BRAINSTEM)


@pytest.fixture(scope="module")
def sources() -> dict[str, anatomies.Anatomy]:
    return {name: load_anatomy(name, 3) for name in SOURCES}


def test_every_source_file_is_installed_pinned_and_hashed():
    for key in anatomies._FILES:
        path = source_file(key)
        assert path.is_file() and path.name.endswith(".nii.gz"), key


@pytest.mark.parametrize("change, expected", [
    ({"sha256": "0" * 64}, "sha256"),
    ({"version": "9.9.9"}, "9.9.9 is pinned"),
    ({"distribution": "brainfm-no-such-package"}, "is not installed"),
])
def test_a_missing_or_different_file_is_a_one_line_error_saying_how_to_install(monkeypatch, change, expected):
    distribution, version, relative, sha256 = anatomies._FILES["oasis/mask"]
    spec = {"distribution": distribution, "version": version, "relative": relative, "sha256": sha256, **change}
    monkeypatch.setitem(anatomies._FILES, "oasis/mask", tuple(spec.values()))
    with pytest.raises(BrainFMInputError) as info:
        source_file("oasis/mask")
    message = str(info.value)
    assert expected in message and "\n" not in message
    assert "T_template0_BrainCerebellumMask.nii.gz" in message and anatomies.INSTALL_HINT in message
    with pytest.raises(ValueError, match="unknown anatomy file"):
        source_file("oasis/nothing")


def test_each_source_has_every_class_a_plausible_brain_and_the_common_grid(sources):
    for name, anatomy in sources.items():
        assert anatomy.labels.shape == anatomy.mask.shape == anatomy.t1.shape == tuple(f // 3 for f in FOV_MM)
        assert np.allclose(np.diag(anatomy.affine)[:3], 3.0)
        present = set(np.unique(anatomy.labels).tolist())
        missing = [LABEL_NAMES[k] for k in REQUIRED if k not in present]
        assert not missing, f"{name} lacks {missing}"
        brain_ml = anatomy.mask.sum() * anatomy.voxel_ml
        assert 900 < brain_ml < 2000, (name, brain_ml)
        ventricles_ml = (anatomy.labels == VENTRICLES).sum() * anatomy.voxel_ml
        assert 3 < ventricles_ml < 120, (name, ventricles_ml)
        # tissue inside the brain mask, skull and scalp outside it
        inside = anatomy.labels[anatomy.mask]
        assert np.isin(inside, (CORTICAL_GM, WM, DEEP_GM)).mean() > 0.5
        assert np.isin(inside, (SKULL, SOFT_TISSUE)).mean() < 0.005  # edge voxels at 3 mm: mode vs mean
        # white matter is the brightest brain tissue on each source's own T1 (where it is a real T1)
        assert np.median(anatomy.t1[anatomy.labels == WM]) > np.median(anatomy.t1[anatomy.labels == CORTICAL_GM])
        assert not anatomy.labels.flags.writeable
    assert [sources[n].has_skull for n in SOURCES] == [False, True, True, True]


def test_fractions_are_partial_volumes_whose_mode_is_the_label_map(sources):
    anatomy = sources["oasis"]
    fractions = anatomy.fractions()
    assert fractions.shape == (len(LABEL_NAMES), *anatomy.labels.shape)
    assert np.allclose(fractions.sum(0), 1.0, atol=1e-5)
    assert np.array_equal(np.argmax(fractions, axis=0), anatomy.labels)
    mixed = (fractions.max(0) < 0.99).mean()
    assert 0.05 < mixed < 0.6  # boundaries are partial volume, not hard labels


def test_different_sources_are_different_anatomies(sources):
    """Brain masks and cortex overlap far from perfectly on the common grid; ICBM152 2009a and FSL's MNI152 are
    two averages of MNI152 brains in one space, so they overlap most (measured: brain 0.948, cortex 0.70)."""
    for a, b in itertools.combinations(SOURCES, 2):
        brain = dice(sources[a].mask, sources[b].mask)
        cortex = dice(sources[a].labels == CORTICAL_GM, sources[b].labels == CORTICAL_GM)
        mni_pair = {a, b} == {"icbm152", "mni152fsl"}
        assert brain < (0.96 if mni_pair else 0.93) and cortex < (0.75 if mni_pair else 0.6), (a, b, brain, cortex)
        assert not np.array_equal(sources[a].labels, sources[b].labels)


def test_resolutions_agree_on_volumes():
    coarse, fine = load_anatomy("oasis", 3), load_anatomy("oasis", 2)
    for label in (CORTICAL_GM, WM, CSF):
        ml = [(a.labels == label).sum() * a.voxel_ml for a in (coarse, fine)]
        assert abs(ml[0] - ml[1]) / ml[1] < 0.15, (LABEL_NAMES[label], ml)
    assert abs(coarse.mask.sum() * coarse.voxel_ml - fine.mask.sum() * fine.voxel_ml) < 30
    with pytest.raises(ValueError, match="resolution"):
        load_anatomy("oasis", 4)
    with pytest.raises(ValueError, match="unknown anatomy"):
        load_anatomy("colin27", 2)


def test_pydeface_head_gets_a_plausible_derived_brain_mask(sources):
    head = load_anatomy("pydeface", 1)
    brain_ml = head.mask.sum() / 1000.0
    assert 900 < brain_ml < 1800
    # the derived mask covers the brain's bright tissue and leaves the scalp (as bright) outside
    assert np.median(head.t1[head.mask]) > 2 * np.median(head.t1[~head.mask & (head.labels == CSF)])
    assert (head.labels[head.mask] == SOFT_TISSUE).sum() == 0


def test_registered_mask_matches_a_reference_mask():
    """The pydeface route (an atlas's head and mask registered onto a head without a mask) run on OASIS, whose own
    mask is the reference, with FSL's MNI152 as the atlas: Dice 0.954 when measured."""
    oasis = load_anatomy("oasis", 1)
    derived = anatomies.derive_brain_mask(oasis.t1, oasis.affine, atlas="mni152fsl")
    assert dice(derived, oasis.mask) > 0.93
    assert 0.9 < derived.sum() / oasis.mask.sum() < 1.15


def test_cli_lists_every_source(capsys):
    from brainfm.cli import main

    assert main(["data", "anatomies"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SOURCES) and "skull drawn" in out and "skull own" in out
