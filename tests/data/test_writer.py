"""Shard writer: round trip, index (counts, modalities, sha256), subject-level splits, rejections, CLI exit
code, crash + resume, foreign output folders, and worker processes that die with a killed build."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from brainfm.data import writer as writer_mod
from brainfm.data.reader import make_dataloader
from brainfm.data.writer import FORMAT, build_shards, load_index
from brainfm.io import BrainFMInputError

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "data" / "tiny.yaml"


def _read_all_3d(out: Path, split: str) -> dict[str, dict]:
    samples = {}
    for batch in make_dataloader(out, split, mode="3d", batch_size=1, seed=0, drop_last=False):
        meta = batch["meta"][0]
        samples[meta["subject"] + "/" + Path(meta["source_path"]).name] = batch
    return samples


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_round_trip_equals_preprocess_output(shard_set):
    from brainfm.data.anatomy import compute_anatomy
    from brainfm.data.preprocess import preprocess_scan

    root, config = shard_set["root"], shard_set["config"]
    batch = _read_all_3d(shard_set["out"], "train")["sub-b/b.nii.gz"]
    scan = preprocess_scan(
        root / "b.nii.gz",
        "T1",
        config.preprocess,
        mask_path=root / "b_mask.nii.gz",
        label_path=root / "b_label.nii.gz",
    )
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
    assert meta["key"] == "sub-b_00004"  # subject + CSV line
    np.testing.assert_allclose(meta["grid_affine"], scan.affine)
    assert tuple(meta["source_shape"]) == scan.source_shape
    assert meta["scalars"]["brain_volume_ml"] == pytest.approx(anatomy.scalars["brain_volume_ml"])


def test_npy_members_are_plain_numpy_files(shard_set):
    """webdataset's npy encoder writes exactly numpy's non-pickle format (no object arrays, C order)."""
    index = load_index(shard_set["out"])
    shard = shard_set["out"] / index["splits"]["train"][0]["name"]
    with tarfile.open(shard) as archive:
        members = {m.name: archive.extractfile(m).read() for m in archive if m.name.endswith(".npy")}
    assert {name.split(".", 1)[1] for name in members} >= {"image.npy", "mask.npy", "anatomy.npy"}
    for name, raw in members.items():
        array = np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)
        assert array.dtype in (np.float16, np.uint8) and array.flags.c_contiguous
        again = io.BytesIO()
        np.lib.format.write_array(again, array, allow_pickle=False)
        assert again.getvalue() == raw, name


def test_index_counts_modalities_and_sha256(shard_set):
    from brainfm.data.preprocess import recipe_dict

    out, report = shard_set["out"], shard_set["report"]
    index = load_index(out)
    assert index["format"] == FORMAT
    assert report.n_accepted == 4 and sum(report.counts.values()) == 4
    assert index["recipe"] == recipe_dict(shard_set["config"].preprocess)
    for split, shards in index["splits"].items():
        counts = index["counts"][split]
        assert counts["n_samples"] == sum(len(s["keys"]) for s in shards) == report.counts[split]
        assert counts["n_shards"] == len(shards)
        n = counts["n_samples"]
        expected = {"T1": n} if n else {}
        assert counts["modalities"] == expected and index["modalities"][split] == sorted(expected)
        assert counts["sites"] == ({"site1": n} if n else {}) and counts["datasets"] == (
            {"unknown": n} if n else {}
        )
        for number, shard in enumerate(shards):
            assert shard["name"] == f"{split}-{number:06d}.tar" and shard["n_samples"] == 1
            assert len(shard["slice_brain_voxels"][0]) == 40
            assert _sha256(out / shard["name"]) == shard["sha256"]
    assert index["counts"]["test"]["n_samples"] == 0 and index["modalities"]["test"] == []  # all bad rows
    # sub-a (two scans), sub-b, sub/c: three subjects, counted by their ids, not by sanitized keys
    assert sum(c["n_subjects"] for c in index["counts"].values()) == 3
    assert index["counts"]["train"]["n_subjects"] >= 2


def test_load_index_refuses_an_older_format_in_one_line(tmp_path):
    old = {"format": "brainfm-shards/1", "splits": {}, "counts": {}}
    (tmp_path / "index.json").write_text(json.dumps(old))
    with pytest.raises(BrainFMInputError) as info:
        load_index(tmp_path)
    message = str(info.value)
    assert "brainfm-shards/1" in message and "rebuild the shards" in message and "\n" not in message
    with pytest.raises(BrainFMInputError, match="no index.json"):
        load_index(tmp_path / "nothere")


def test_resume_rebuilds_a_corrupted_shard_to_the_same_bytes(shard_set, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(shard_set["out"], out)
    index = load_index(out)
    victim = out / index["splits"]["train"][0]["name"]
    raw = bytearray(victim.read_bytes())
    raw[2000] ^= 0xFF
    victim.write_bytes(bytes(raw))
    assert _sha256(victim) != index["splits"]["train"][0]["sha256"]
    report = build_shards(shard_set["manifest"], out, shard_set["config"], workers=1)
    assert report.shards_built == 1 and report.n_accepted == 4
    assert _sha256(victim) == index["splits"]["train"][0]["sha256"]
    assert load_index(out)["splits"] == index["splits"]


def test_subject_with_two_scans_stays_in_one_split(shard_set):
    index = load_index(shard_set["out"])
    splits_of_a = {
        split
        for split, shards in index["splits"].items()
        for s in shards
        for k in s["keys"]
        if k.startswith("sub-a_")
    }
    assert len(splits_of_a) == 1
    assert (
        sum(k.startswith("sub-a_") for shards in index["splits"].values() for s in shards for k in s["keys"])
        == 2
    )


def test_each_bad_input_is_rejected_with_its_reason(shard_set):
    out, root = shard_set["out"], shard_set["root"]
    records = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    reasons = {(Path(r["path"]).name, r["subject"]): r["reason"] for r in records}
    for name, reason in shard_set["bad_inputs"].items():
        assert reasons[(name, f"bad-{name.split('.')[0]}")] == reason
    assert reasons[("b.nii.gz", "bad-modality")] == "bad_modality"
    assert len(records) == len(shard_set["bad_inputs"]) + 1 == shard_set["report"].n_rejected
    assert all("\n" not in r["message"] and str(root) in r["message"] for r in records)
    assert [r["row"] for r in records] == list(range(6, 12))  # CSV lines, in manifest order
    assert set(records[0]) == {"row", "path", "subject", "reason", "message"}


def test_cli_exits_nonzero_when_nothing_is_accepted(shard_set, tmp_path, capsys):
    from brainfm.cli import main

    root = shard_set["root"]
    (tmp_path / "m.csv").write_text(
        f"path,modality\n{root / 'nan.nii.gz'},T1\n{root / 'nothere.nii.gz'},T1\n"
    )
    assert (
        main(
            [
                "data",
                "shards",
                "--manifest",
                str(tmp_path / "m.csv"),
                "--out",
                str(tmp_path / "out"),
                "--config",
                str(CONFIG),
                "--workers",
                "1",
            ]
        )
        == 1
    )
    assert "accepted 0 scan(s)" in capsys.readouterr().out
    assert len((tmp_path / "out" / "rejected.jsonl").read_text().splitlines()) == 2
    assert not list((tmp_path / "out").glob("*.tar"))


def test_a_foreign_non_empty_folder_is_refused_and_left_alone(shard_set, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "train-000000.tar").write_bytes(b"my own tar, not a shard")
    with pytest.raises(BrainFMInputError, match="not empty and holds no shard build"):
        build_shards(shard_set["manifest"], out, shard_set["config"], workers=1)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "train-000000.tar"]
    assert (out / "train-000000.tar").read_bytes() == b"my own tar, not a shard"


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

    real_encode = writer_mod.encode_sample
    calls = []

    def crash_on_second(entry, recipe):
        calls.append(entry.row)
        if len(calls) == 2:
            raise RuntimeError("simulated crash while writing a shard")
        return real_encode(entry, recipe)

    monkeypatch.setattr(writer_mod, "encode_sample", crash_on_second)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_shards(shard_set["manifest"], out, shard_set["config"], workers=1)
    assert (out / lost[0]).is_file() and not (out / lost[1]).exists()
    assert not [
        p for p in out.iterdir() if ".tmp" in p.name
    ]  # the crash left no partial tar, the old one is gone
    monkeypatch.setattr(writer_mod, "encode_sample", real_encode)

    stamp_first = ((out / lost[0]).stat().st_ino, (out / lost[0]).stat().st_mtime_ns)
    report = build_shards(shard_set["manifest"], out, shard_set["config"], workers=1)
    assert report.shards_built == 1 and report.shards_kept == len(names) - 1 and report.n_accepted == 4
    for name, stamp in kept.items():
        assert ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == stamp
    assert ((out / lost[0]).stat().st_ino, (out / lost[0]).stat().st_mtime_ns) == stamp_first
    resumed = json.loads((out / "index.json").read_text())
    # 2 workers at first, 1 worker now: byte-identical shards
    assert resumed["splits"] == original["splits"] and resumed["counts"] == original["counts"]
    assert all(
        _sha256(out / s["name"]) == s["sha256"] for shards in resumed["splits"].values() for s in shards
    )
    assert (out / "rejected.jsonl").read_text() == (shard_set["out"] / "rejected.jsonl").read_text()


# ------------------------------------------------------------------------------------------------ processes
def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) from /proc (psutil is not a dependency)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry.name)] = (int(fields[1]), fields[0])
    return table


def _children(pid: int) -> set[int]:
    return {child for child, (parent, _) in _proc_table().items() if parent == pid}


def _alive(pids: set[int]) -> set[int]:
    table = _proc_table()
    return {pid for pid in pids if pid in table and table[pid][1] not in ("Z", "X")}


def _wait_for(condition, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    return condition()


def _subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_of_a_shard_build_leaves_no_worker_behind(shard_set, tmp_path):
    build = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "brainfm.cli",
            "data",
            "shards",
            "--manifest",
            str(shard_set["manifest"]),
            "--out",
            str(tmp_path / "out"),
            "--config",
            str(CONFIG),
            "--workers",
            "2",
        ],
        env=_subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    workers: set[int] = set()
    try:
        workers = _wait_for(lambda: c if len(c := _children(build.pid)) >= 2 else None, timeout=120) or set()
        assert len(workers) >= 2, "the build never started its two workers"
        assert build.poll() is None, "the build finished before it could be killed"
        os.kill(build.pid, signal.SIGKILL)
        build.wait(timeout=10)
        assert _wait_for(lambda: not _alive(workers), timeout=5), (
            f"worker(s) {sorted(_alive(workers))} outlived the killed build"
        )
    finally:
        if build.poll() is None:
            build.kill()
        for pid in _alive(workers):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_parent_checks_for_workers_without_prctl(tmp_path):
    """The fallbacks: a worker whose parent is already gone exits at once; a polling worker exits when its
    parent dies."""
    script = (
        "import os, sys, time\n"
        "from brainfm.data.writer import _die_with_parent, _watch_parent\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    _die_with_parent(os.getppid() + 1_000_000)\n"
        "    os._exit(0)\n"
        "print('orphan-exit', os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]), flush=True)\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    _watch_parent(os.getppid(), interval=0.05)\n"
        "    os._exit(0)\n"
        "print('watcher', child, flush=True)\n"
        "time.sleep(120)\n"
    )
    middle = subprocess.Popen(
        [sys.executable, "-c", script], env=_subprocess_env(), stdout=subprocess.PIPE, encoding="utf-8", errors="replace"
    )
    try:
        assert middle.stdout.readline().split() == ["orphan-exit", "1"]
        label, watcher = middle.stdout.readline().split()
        assert label == "watcher" and _alive({int(watcher)})
        os.kill(middle.pid, signal.SIGKILL)
        middle.wait(timeout=10)
        assert _wait_for(lambda: not _alive({int(watcher)}), timeout=5), (
            "the polling worker outlived its parent"
        )
    finally:
        if middle.poll() is None:
            middle.kill()
