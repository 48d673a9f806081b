"""Splits: deterministic, leak-free (no group straddles), explicit assignments win."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from r2m.config import DataConfig
from r2m.data import SPLITS, assign_splits, group_of, validate_dataset
from r2m.data.splits import hashed_splits, split_sizes
from r2m.errors import DatasetError

FRACTIONS = DataConfig().split_fractions


@pytest.mark.parametrize(
    "path, group",
    [
        ("astronaut__crop07.png", "astronaut"),
        ("astronaut__crop__x.png", "astronaut"),
        ("coffee.png", "coffee"),
        ("frames/vid_017/0003.png", "vid_017"),
        ("FaceForensics++/original/c23/frames/000/012.png", "000"),
        ("__odd.png", "__odd"),
    ],
)
def test_group_ids(path, group):
    assert group_of(path) == group


@pytest.mark.parametrize("n", [3, 4, 5, 7, 10, 33, 1000])
def test_split_sizes_fill_every_split_and_follow_fractions(n):
    sizes = split_sizes(n, FRACTIONS)
    assert sum(sizes.values()) == n and min(sizes.values()) >= 1
    for split in SPLITS:
        assert abs(sizes[split] - n * FRACTIONS[split]) <= (1.5 if n < 10 else 1.0)  # ≥1 each moves ≤ 1.5


def test_hashed_splits_are_deterministic_and_order_free():
    groups = [f"video{i:03d}" for i in range(200)]
    first = hashed_splits(groups, FRACTIONS, seed=0)
    assert hashed_splits(list(reversed(groups)), FRACTIONS, seed=0) == first
    assert Counter(first.values()) == Counter(split_sizes(200, FRACTIONS))
    other_seed = hashed_splits(groups, FRACTIONS, seed=1)
    assert sum(first[g] != other_seed[g] for g in groups) > 20  # the seed matters


def test_each_class_stratum_gets_every_split():
    # 3 real-only groups, 3 fake-only groups: independent coin flips would often leave a split
    # without one class; ranking within each stratum never does.
    labels = {f"r{i}": {0} for i in range(3)} | {f"f{i}": {1} for i in range(3)}
    for seed in range(20):
        assignment = assign_splits(labels, FRACTIONS, seed)
        for split in SPLITS:
            present = {lab for g, s in assignment.items() if s == split for lab in labels[g]}
            assert present == {0, 1}


def test_explicit_lists_win_and_must_cover_every_group():
    labels = {g: {0, 1} for g in ("a", "b", "c", "d")}
    lists = {"train": ["a", "b"], "val": ["c"], "test": ["d"]}
    assert assign_splits(labels, FRACTIONS, 0, lists=lists) == {"a": "train", "b": "train", "c": "val", "d": "test"}
    with pytest.raises(ValueError, match="not listed.*'d'"):
        assign_splits(labels, FRACTIONS, 0, lists={"train": ["a", "b"], "val": ["c"]})
    with pytest.raises(ValueError, match="no images: 'zzz'"):
        assign_splits(labels, FRACTIONS, 0, lists={**lists, "test": ["d", "zzz"]})
    with pytest.raises(ValueError, match="'a' is listed in both"):
        assign_splits(labels, FRACTIONS, 0, lists={**lists, "val": ["c", "a"]})


def test_fixed_splits_are_kept_and_the_rest_hashed():
    labels = {f"g{i}": {0, 1} for i in range(10)}
    assignment = assign_splits(labels, FRACTIONS, 0, fixed={"g0": "test", "g1": "test"})
    assert assignment["g0"] == assignment["g1"] == "test" and set(assignment) == set(labels)


# --- through validate_dataset, on disk --------------------------------------------------------


def _write(folder: Path, doc: dict, videos: int = 8, frames: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for label in ("real", "fake"):
        for v in range(videos):
            for n in range(frames):
                path = folder / label / "frames" / f"v{v:02d}" / f"{n}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
    (folder / "generator.yaml").write_text(yaml.safe_dump({"family": "FR", "domain": "ff", "role": "seen", **doc}))
    return folder


def test_no_video_straddles_splits_for_any_seed(tmp_path):
    root = tmp_path / "generators"
    folder = _write(root / "fr-ff", {"name": "fr-ff"})
    for seed in range(4):
        ds = validate_dataset(folder, root, DataConfig(split_seed=seed))
        for group in {s.group for s in ds.samples}:
            assert len({s.split for s in ds.samples if s.group == group}) == 1, group
        assert {s.split for s in ds.samples} == set(SPLITS)
    again = validate_dataset(folder, root, DataConfig(split_seed=3))
    assert [(s.path, s.split) for s in again.samples] == [(s.path, s.split) for s in ds.samples]


def test_manifest_split_lists_win_over_hashing(tmp_path):
    root = tmp_path / "generators"
    lists = {"train": [f"v{v:02d}" for v in range(2)], "val": ["v02", "v03"], "test": [f"v{v:02d}" for v in range(4, 8)]}
    folder = _write(root / "fr-ff", {"name": "fr-ff", "splits": lists})
    ds = validate_dataset(folder, root, DataConfig())
    for split, groups in lists.items():
        assert {s.group for s in ds.split(split)} == set(groups)
    lists["test"].remove("v07")
    (folder / "generator.yaml").write_text(
        yaml.safe_dump({"name": "fr-ff", "family": "FR", "domain": "ff", "role": "seen", "splits": lists})
    )
    with pytest.raises(DatasetError, match="not listed.*'v07'"):
        validate_dataset(folder, root, DataConfig())


def test_explicit_samples_straddling_splits_are_a_leak(tmp_path):
    root = tmp_path / "generators"
    folder = root / "listed"
    _write(folder, {"name": "listed"}, videos=3, frames=2)
    samples = [
        {"path": f"{label}/frames/v{v:02d}/{n}.png", "label": int(label == "fake"), "split": SPLITS[v]}
        for label in ("real", "fake") for v in range(3) for n in range(2)
    ]
    samples[1]["split"] = "test"  # frame 1 of real v00 lands in test, frame 0 in train
    for sub in ("real", "fake"):
        (folder / sub).rename(root / f"{sub}-moved")
    doc = {"name": "listed", "family": "FR", "domain": "ff", "role": "seen", "samples_root": str(root), "samples": [
        {**s, "path": s["path"].replace("real/", "real-moved/").replace("fake/", "fake-moved/")} for s in samples
    ]}
    (folder / "generator.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(DatasetError, match="'v00' straddles splits"):
        validate_dataset(folder, root, DataConfig())
    samples[1]["split"] = "train"
    doc["samples"] = [{**s, "path": s["path"].replace("real/", "real-moved/").replace("fake/", "fake-moved/")} for s in samples]
    (folder / "generator.yaml").write_text(yaml.safe_dump(doc))
    ds = validate_dataset(folder, root, DataConfig())
    assert {s.group: s.split for s in ds.samples} == {"v00": "train", "v01": "val", "v02": "test"}
