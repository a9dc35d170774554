"""The fine-tuning split, by SUBJECT: which scans calibrate the heads, which may train them, which test them.

A head's test scores mean something only on subjects nothing upstream has seen. The foundation model saw its
pretraining shards (train and validation splits) and its healthy calibration scans, and it reports z-maps whose
healthy false-positive rate is fixed on those calibration scans, so a healthy test scan from them flatters every
method. The model folder records where that data is (``model_index.json``: the pretraining config's shard folder,
the calibration's source and split, and each site adaptation's subjects); :func:`seen_subjects` reads the subject
ids off it, and :func:`split_cohort` keeps them out of head calibration and every test set (they may still train
heads).

Subjects are compared as WebDataset keys spell them (``brainfm.data.manifest.sanitize_key``): a shard index
stores keys, not raw ids. Two ids that sanitise alike are treated as one subject, which can only exclude more.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from brainfm.config import FinetuneDataSection
from brainfm.data.manifest import read_manifest, sanitize_key
from brainfm.finetune.features import FeatureSet, ScanRecord
from brainfm.io import BrainFMInputError

ADAPTATION_SPLIT = "adapt"  # the split brainfm.anomaly.adapt records for its recalibration
_KEY = re.compile(r"^(?P<subject>.+)_(?P<row>\d{5,})$")  # brainfm.data.writer.sample_key: subject _ CSV line


def subject_key(subject: str) -> str:
    """A subject id as the shard index spells it."""
    return sanitize_key(subject)


def subject_of_key(key: str) -> str:
    """The subject part of a shard sample key (the inverse of ``brainfm.data.writer.sample_key``)."""
    match = _KEY.match(key)
    if match is None:
        raise BrainFMInputError(None, f"shard sample key {key!r} is not <subject>_<row>")
    return match["subject"]


# ------------------------------------------------------------------------------------------------ seen subjects
@dataclasses.dataclass(frozen=True)
class SeenSubjects:
    """Subject keys the foundation model has seen, per role (e.g. "pretraining split 'train' of <shards>")."""

    roles: dict[str, frozenset[str]]
    policy: str  # "from_model" (read off the model folder) or "disjoint" (stated by the user)

    def __contains__(self, subject: str) -> bool:
        key = subject_key(subject)
        return any(key in keys for keys in self.roles.values())

    def describe(self) -> dict[str, Any]:
        return {"policy": self.policy, "roles": {role: len(keys) for role, keys in self.roles.items()}}


def _shard_subjects(shard_dir: Path, split: str) -> frozenset[str]:
    from brainfm.data.writer import load_index

    shards = load_index(shard_dir).get("splits", {}).get(split, [])
    return frozenset(subject_of_key(key) for shard in shards for key in shard.get("keys", []))


def _manifest_subjects(manifest: Path, split: str) -> frozenset[str]:
    """Rows of ``split``, or without a split cell: the rows ``brainfm calibrate --manifest`` would read. A row
    the reader rejects now (e.g. its file has moved since) has no split to go by, so its subject counts too."""
    rows, rejected = read_manifest(manifest)
    return frozenset([subject_key(r.subject) for r in rows if not r.split or r.split == split]
                     + [subject_key(r.subject) for r in rejected])


def _adaptation_roles(record: Mapping[str, Any] | None) -> dict[str, frozenset[str]]:
    """Subjects a site adaptation trained the UNet's adapters and recalibrated the threshold on (its ``adapt``
    part; the held-out ``check`` part only measured a false-positive rate), for it and every earlier one."""
    roles: dict[str, frozenset[str]] = {}
    depth = 0
    while record:
        depth += 1
        subjects = (record.get("split") or {}).get("adapt_subjects") or []
        roles[f"site adaptation {depth} on {record.get('healthy_source')}"] = frozenset(
            subject_key(s) for s in subjects)
        record = record.get("previous")
    return roles


def seen_subjects(model_dir: str | os.PathLike, policy: str = "from_model") -> SeenSubjects:
    """The subjects behind the model folder's pretraining shards (train and validation splits), its
    calibration and any site adaptation, from ``model_index.json``; refuses (one line) when that record is
    missing or unreadable."""
    if policy == "disjoint":
        return SeenSubjects(roles={}, policy=policy)
    from brainfm import safety

    index_path = Path(model_dir) / safety.MODEL_INDEX
    hint = ("; if this cohort shares no subject with the model's pretraining and calibration data, set "
            "data.pretraining_subjects: disjoint")
    try:
        index = safety.read_json(index_path)
    except (OSError, ValueError) as exc:
        raise BrainFMInputError(index_path, f"cannot read which subjects the model has seen ({exc}){hint}") from exc
    data = ((index.get("provenance") or {}).get("pretrain_config") or {}).get("data") or {}
    if not data.get("shard_dir"):
        raise BrainFMInputError(index_path, f"records no pretraining shards (provenance.pretrain_config.data."
                                            f"shard_dir), so its training subjects cannot be excluded{hint}")
    roles: dict[str, frozenset[str]] = {}
    adaptation = index.get("adaptation") or None
    try:
        for split in dict.fromkeys((data.get("train_split", "train"), data.get("val_split", "val"))):
            roles[f"pretraining split {split!r} of {data['shard_dir']}"] = _shard_subjects(Path(data["shard_dir"]),
                                                                                         split)
        roles.update(_adaptation_roles(adaptation))
        calibration = index.get("calibration_info") or {}
        # a site adaptation's calibration is on its adapt part (above); any other names its shards or manifest
        if calibration.get("source") and not (adaptation and calibration.get("split") == ADAPTATION_SPLIT):
            source, split = Path(calibration["source"]), str(calibration.get("split", "val"))
            subjects = _shard_subjects(source, split) if source.is_dir() else _manifest_subjects(source, split)
            roles[f"calibration split {split!r} of {source}"] = subjects
    except BrainFMInputError as exc:
        raise BrainFMInputError(index_path, f"cannot read the subjects the model has seen: {exc}{hint}") from exc
    return SeenSubjects(roles=roles, policy=policy)


# ------------------------------------------------------------------------------------------------ disjointness
def check_disjoint(groups: Mapping[str, Iterable[str]], where: Any = None) -> None:
    """Refuse when a subject is in two of ``groups`` (role -> subject ids): training, calibration and test data
    must never share a subject."""
    members = {role: {subject_key(s) for s in subjects} for role, subjects in groups.items()}
    roles = list(members)
    for i, first in enumerate(roles):
        for second in roles[i + 1:]:
            shared = members[first] & members[second]
            if shared:
                listed = ", ".join(sorted(shared)[:5]) + (", ..." if len(shared) > 5 else "")
                raise BrainFMInputError(where, f"{len(shared)} subject(s) in both {first} and {second}: {listed}")


def subjects_of(records: Iterable[ScanRecord]) -> list[str]:
    return sorted({r.subject for r in records})


# ------------------------------------------------------------------------------------------------ split
@dataclasses.dataclass
class CohortSplit:
    """Scan names per role; the roles are disjoint by subject, and calibration and test hold unseen subjects."""

    calibration: list[str]  # healthy, unseen: head thresholds at the unsupervised map's false-positive rate
    healthy_train: list[str]  # healthy, unlabelled training data (may include the model's own subjects)
    train_pool: dict[str, list[str]]  # lesion kind -> scans whose labels MAY be used, in seeded order
    test: dict[str, list[str]]  # lesion kind -> held-out scans of unseen subjects
    healthy_test: list[str]  # healthy unseen controls of the test set (false positives)
    subjects: dict[str, str]  # scan name -> subject id
    seen: dict[str, Any]  # how the model's subjects were found and how many the cohort holds

    def labelled_order(self) -> list[str]:
        """The training pool interleaved across kinds, so the first n labelled scans cover the kinds evenly."""
        pools = [list(self.train_pool[k]) for k in sorted(self.train_pool)]
        order = []
        while any(pools):
            for pool in pools:
                if pool:
                    order.append(pool.pop(0))
        return order

    def roles(self) -> dict[str, list[str]]:
        """Subject ids per role (training = labelled pool and unlabelled healthy together)."""
        def of(names: Iterable[str]) -> list[str]:
            return sorted({self.subjects[n] for n in names})

        return {
            "training": of([n for names in self.train_pool.values() for n in names] + self.healthy_train),
            "calibration": of(self.calibration),
            "test": of([n for names in self.test.values() for n in names] + self.healthy_test),
        }

    def check(self, where: Any = None) -> None:
        """Refuse a split whose roles share a subject, or whose calibration or test holds a subject the model
        has seen."""
        roles = self.roles()
        check_disjoint(roles, where)
        check_disjoint({"the model's pretraining or calibration data": self.seen["cohort_subjects_seen"],
                        "head calibration or test": roles["calibration"] + roles["test"]}, where)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _by_subject(records: Sequence[ScanRecord]) -> dict[str, list[ScanRecord]]:
    subjects: dict[str, list[ScanRecord]] = {}
    for record in sorted(records, key=lambda r: (r.subject, r.name)):
        subjects.setdefault(record.subject, []).append(record)
    return subjects


def split_cohort(features: FeatureSet, config: FinetuneDataSection, seen: SeenSubjects) -> CohortSplit:
    """Seeded split by subject. Healthy subjects the model has not seen → head calibration, then healthy test
    (``test_fraction``, at least ``min_healthy_test``), the rest train unlabelled with the seen ones; each
    lesion kind's unseen subjects → test (``test_fraction`` of the kind), every other subject of the kind → the
    labelled training pool (a lesion subject's scans without a lesion are in neither: they are not healthy
    controls). Refuses when too few unseen healthy subjects are left."""
    rng = np.random.default_rng(config.seed)
    subjects = _by_subject(features.records)
    healthy = [s for s, scans in subjects.items() if not any(r.has_lesion for r in scans)]
    unseen_healthy = [s for s in healthy if s not in seen]
    need = config.n_calibration_healthy + config.min_healthy_test
    if len(unseen_healthy) < need:
        raise BrainFMInputError(features.source.get("manifest"), (
            f"{len(unseen_healthy)} of {len(healthy)} healthy subjects are unseen by the model (the others are "
            f"in its pretraining or calibration data); head calibration needs {config.n_calibration_healthy} "
            f"(data.n_calibration_healthy) and the healthy test set {config.min_healthy_test} "
            "(data.min_healthy_test): add healthy subjects the model has not seen"))
    unseen_healthy = [unseen_healthy[i] for i in rng.permutation(len(unseen_healthy))]
    calibration = unseen_healthy[:config.n_calibration_healthy]
    rest = unseen_healthy[config.n_calibration_healthy:]
    n_healthy_test = min(len(rest), max(config.min_healthy_test, int(round(config.test_fraction * len(rest)))))
    healthy_train = rest[n_healthy_test:] + [s for s in healthy if s in seen]

    def scans(names: Iterable[str], lesion_only: bool = False) -> list[str]:
        return [r.name for s in names for r in subjects[s] if r.has_lesion or not lesion_only]

    train_pool, test = {}, {}
    lesion = {s: next(r.lesion_type for r in scans_ if r.has_lesion) for s, scans_ in subjects.items()
              if s not in healthy}
    for kind in sorted(set(lesion.values())):
        members = [s for s in sorted(lesion) if lesion[s] == kind]
        members = [members[i] for i in rng.permutation(len(members))]
        unseen = [s for s in members if s not in seen]
        n_test = min(len(unseen), len(members) - 1, max(1, int(round(config.test_fraction * len(members)))))
        test_subjects = unseen[:n_test]
        test[kind] = scans(test_subjects, lesion_only=True)
        train_pool[kind] = scans([s for s in members if s not in test_subjects], lesion_only=True)
    in_cohort = sorted(s for s in subjects if s in seen)
    split = CohortSplit(
        calibration=scans(calibration), healthy_train=scans(healthy_train), train_pool=train_pool, test=test,
        healthy_test=scans(rest[:n_healthy_test]), subjects={r.name: r.subject for r in features.records},
        seen={**seen.describe(), "cohort_subjects_seen": in_cohort},
    )
    split.check(features.source.get("manifest"))
    return split


__all__ = ["CohortSplit", "SeenSubjects", "check_disjoint", "seen_subjects", "split_cohort", "subject_key",
           "subject_of_key", "subjects_of"]
