"""Streaming reader: shapes and slice filter, pure-function order, exact resume, ranks x workers, corrupt
shards, brace and pipe: URLs, deterministic augmentation."""

from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import pytest
import torch

from brainfm.config import ReaderConfig
from brainfm.data.reader import make_dataloader
from brainfm.io import BrainFMInputError


def index_items(out, mode: str, min_brain_fraction: float = 0.05) -> int:
    """Volumes (3D) or axial slices with at least ``min_brain_fraction`` brain (2D) in the train split,
    counted from index.json alone (independently of the reader's plan)."""
    index = json.loads((out / "index.json").read_text())
    shards = index["splits"]["train"]
    if mode == "3d":
        return sum(s["n_samples"] for s in shards)
    x, y = index["grid_shape"][:2]
    return sum(
        int((np.asarray(v) >= min_brain_fraction * x * y).sum())
        for s in shards
        for v in s["slice_brain_voxels"]
    )


def items(batches) -> list[tuple[str, int]]:
    return [(m["key"], int(z)) for b in batches for m, z in zip(b["meta"], b["slice_index"], strict=True)]


def loader(out, **kw):
    args = {"mode": "2d", "batch_size": 4, "seed": 3, "drop_last": False} | kw
    return make_dataloader(out, "train", **args)


def test_2d_batches_shapes_and_brain_slices(shard_set):
    out = shard_set["out"]
    batches = list(loader(out, batch_size=8))
    first = batches[0]
    assert first["image"].shape == (8, 1, 40, 48) and first["image"].dtype == torch.float32
    assert first["mask"].shape == (8, 1, 40, 48) and first["anatomy"].shape == (8, 2, 40, 48)
    assert first["slice_index"].dtype == torch.long and first["slice_position"].shape == (8,)
    all_items = items(batches)
    assert len(all_items) == len(set(all_items)) == index_items(out, "2d")
    assert index_items(out, "2d") < 40 * index_items(out, "3d")
    for batch in batches:
        brain = batch["mask"].mean(dim=(1, 2, 3))
        assert (brain >= 0.05 - 1e-6).all()
        torch.testing.assert_close(batch["slice_position"], batch["slice_index"].float() / 39)
    # the eligible slices are exactly those of the stored volumes with >= 5% brain
    expected = set()
    for batch in make_dataloader(out, "train", mode="3d", batch_size=1, drop_last=False):
        fractions = batch["mask"][0, 0].mean(dim=(0, 1))
        expected |= {
            (batch["meta"][0]["key"], z) for z in torch.nonzero(fractions >= 0.05).flatten().tolist()
        }
    assert set(all_items) == expected


def test_order_is_pure_function_of_seed_epoch_and_independent_of_workers(shard_set):
    out = shard_set["out"]
    reference = items(loader(out))
    assert items(loader(out)) == reference
    assert items(loader(out, num_workers=2)) == reference
    other_seed = items(loader(out, seed=4))
    assert other_seed != reference and sorted(other_seed) == sorted(reference)
    two_epochs = loader(out)
    epoch0, epoch1 = items(two_epochs), items(two_epochs)
    assert epoch0 == reference and epoch1 != reference and sorted(epoch1) == sorted(reference)
    assert two_epochs.state_dict()["epoch"] == 2
    again = loader(out)
    again.set_epoch(1)
    assert items(again) == epoch1


def test_resume_from_state_dict_yields_exactly_the_remaining_batches(shard_set):
    out = shard_set["out"]
    reference = loader(out, drop_last=True)
    epoch0 = list(reference)
    epoch1_first = next(iter(reference))
    partial = loader(out, drop_last=True)
    it = iter(partial)
    seen = [next(it) for _ in range(5)]
    state = partial.state_dict()
    assert state == {"epoch": 0, "batches_yielded": 5, "seed": 3, "corrupt_count": 0}
    resumed = loader(out, drop_last=True, seed=99, num_workers=2)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert items(seen) + items(rest) == items(epoch0)
    for got, want in zip(rest, epoch0[5:], strict=True):
        torch.testing.assert_close(got["image"], want["image"])
    assert resumed.state_dict()["epoch"] == 1
    assert items([next(iter(resumed))]) == items([epoch1_first])


def test_two_ranks_two_workers_are_disjoint_and_cover_the_split(shard_set):
    out = shard_set["out"]
    total = index_items(out, "2d")
    per_rank = []
    for rank in (0, 1):
        dl = loader(out, rank=rank, world_size=2, num_workers=2, batch_size=3)
        batches = list(dl)
        assert len(batches) == dl.batches_per_epoch()
        per_rank.append(items(batches))
    assert len(per_rank[0]) == len(per_rank[1]) == -(-total // 2)  # equal counts: DDP never waits on a rank
    assert len(set(per_rank[0])) == len(per_rank[0]) and len(set(per_rank[1])) == len(per_rank[1])
    overlap = set(per_rank[0]) & set(per_rank[1])
    assert len(overlap) == 2 * len(per_rank[0]) - total  # only the deterministic wrap-around padding
    assert set(per_rank[0]) | set(per_rank[1]) == set(items(loader(out)))
    truncated = [items(loader(out, rank=r, world_size=2, drop_last=True, batch_size=1)) for r in (0, 1)]
    assert not set(truncated[0]) & set(truncated[1]) and len(truncated[0]) == len(truncated[1]) == total // 2


def test_truncated_shard_skip_counts_and_raise_names_it(shard_set, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(shard_set["out"], copy)
    index = json.loads((copy / "index.json").read_text())
    victim = copy / index["splits"]["train"][0]["name"]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    full = loader(shard_set["out"], batch_size=4)
    n_batches = len(list(full))
    skipping = loader(copy, batch_size=4)
    batches = list(skipping)
    assert len(batches) == n_batches  # same number of same-size batches as intact data
    assert all(len(b["meta"]) == 4 for b in batches[:-1])
    assert skipping.corrupt_count == 1 and skipping.state_dict()["corrupt_count"] == 1
    assert victim.name not in {m["shard"] for b in batches for m in b["meta"]}
    for workers in (0, 2):
        with pytest.raises(BrainFMInputError, match=victim.name):
            list(loader(copy, on_corrupt="raise", num_workers=workers))


def test_brace_pattern_and_pipe_urls(shard_set):
    out = shard_set["out"]
    names = [s["name"] for s in json.loads((out / "index.json").read_text())["splits"]["train"]]
    reference = items(loader(out))
    pattern = f"{out}/train-{{000000..{len(names) - 1:06d}}}.tar"
    assert items(loader(pattern)) == reference
    assert items(loader([f"pipe:cat {out / n}" for n in names])) == reference
    assert items(loader([f"pipe:cat {out / n}" for n in names], index=out, num_workers=2)) == reference


def test_augmentation_is_deterministic_per_position(shard_set):
    out = shard_set["out"]
    config = ReaderConfig(affine_prob=1.0, noise_prob=1.0, contrast_prob=1.0, bias_field_prob=1.0)
    plain = list(itertools.islice(loader(out), 3))  # MONAI RandAffine costs ~20-40 ms per call on CPU
    first = list(itertools.islice(loader(out, augment=config), 3))
    second = list(itertools.islice(loader(out, augment=config, num_workers=2), 3))
    assert items(first) == items(plain)
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a["image"], b["image"])
        torch.testing.assert_close(a["anatomy"], b["anatomy"])
        assert set(np.unique(a["mask"].numpy())) <= {0.0, 1.0}
    assert not torch.allclose(first[0]["image"], plain[0]["image"])
    assert not torch.allclose(first[0]["mask"], plain[0]["mask"])  # spatial: the mask moved with the image


class _Payload:
    """Unpickling this creates a marker file: proof that a shard ran code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_members_are_never_unpickled(shard_set, tmp_path):
    import io
    import pickle
    import tarfile

    copy = tmp_path / "shards"
    shutil.copytree(shard_set["out"], copy)
    victim = copy / json.loads((copy / "index.json").read_text())["splits"]["train"][0]["name"]
    marker = tmp_path / "pwned"
    evil = io.BytesIO()
    np.lib.format.write_array(evil, np.array([_Payload(str(marker))], dtype=object), allow_pickle=True)
    with tarfile.open(victim) as archive:
        members = [(m, archive.extractfile(m).read()) for m in archive]
    key = members[0][0].name.split(".", 1)[0]
    with tarfile.open(victim, "w") as archive:
        for member, payload in members:
            if member.name == f"{key}.image.npy":
                payload = evil.getvalue()  # an object array: numpy would need pickle to load it
            member.size = len(payload)
            archive.addfile(member, io.BytesIO(payload))
        extra = pickle.dumps(_Payload(str(marker)))
        info = tarfile.TarInfo(f"{key}.evil.pyd")  # webdataset's default decoder would unpickle .pyd
        info.size = len(extra)
        archive.addfile(info, io.BytesIO(extra))
    with pytest.raises(
        BrainFMInputError, match=rf"{victim.name}: sample '{key}' does not decode \(.*allow_pickle"
    ):
        list(make_dataloader(copy, "train", mode="3d", batch_size=1, on_corrupt="raise"))
    skipping = make_dataloader(copy, "train", mode="3d", batch_size=1, drop_last=False)
    kept = [b["meta"][0]["key"] for b in skipping]
    assert key not in kept and skipping.corrupt_count == 1
    assert not marker.exists()
