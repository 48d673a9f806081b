"""DeepfakeBench/DF40 JSON import: a manifest pointing at frames in place, splits from the JSON."""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from r2m.config import DataConfig
from r2m.data import import_deepfakebench, load_manifest, read_deepfakebench_json, validate_dataset
from r2m.errors import DatasetError

# FaceForensics++ as DeepfakeBench writes it: dataset → label → split → compression → video.
VIDEOS = {
    "FF-real": {"train": ["000", "001", "002"], "val": ["003"], "test": ["004"]},
    "FF-DF": {"train": ["000_001", "001_002", "002_000"], "val": ["003_004"], "test": ["004_003"]},
    "FF-F2F": {"train": ["000_001"], "val": ["003_004"], "test": ["004_003"]},
}
FOLDERS = {"FF-real": "original_sequences/youtube", "FF-DF": "manipulated_sequences/Deepfakes",
           "FF-F2F": "manipulated_sequences/Face2Face"}


def _frames(frames_root: Path, label: str, video: str, n: int = 2) -> list[str]:
    rel = [f"FaceForensics++/{FOLDERS[label]}/c23/frames/{video}/{i:03d}.png" for i in range(n)]
    rng = np.random.default_rng(zlib.crc32(f"{label}/{video}".encode()))
    for r in rel:
        (frames_root / r).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(frames_root / r)
    return rel


@pytest.fixture
def bench(tmp_path) -> tuple[Path, Path]:
    """(JSON file, frames root) of a tiny FaceForensics++ in DeepfakeBench's JSON layout."""
    frames_root = tmp_path / "rgb"
    tree: dict = {}
    for label, splits in VIDEOS.items():
        for split, videos in splits.items():
            tree.setdefault(label, {}).setdefault(split, {})["c23"] = {
                v: {"label": label, "frames": _frames(frames_root, label, v)} for v in videos
            }
    json_path = tmp_path / "FaceForensics++.json"
    json_path.write_text(json.dumps({"FaceForensics++": tree}))
    return json_path, frames_root


def test_import_points_at_frames_in_place_with_the_json_splits(bench, tmp_path):
    json_path, frames_root = bench
    root = tmp_path / "data" / "generators"
    out = root / "df-ff"
    manifest_path = import_deepfakebench(
        json_path, "FaceForensics++", frames_root, out, family="FS", domain="ff", labels=["FF-real", "FF-DF"]
    )
    assert manifest_path == out / "generator.yaml"
    assert sorted(p.name for p in out.iterdir()) == ["generator.yaml"]  # no image copied
    manifest = load_manifest(out)
    assert manifest.samples_root == str(frames_root.resolve()) and manifest.family == "FS"

    ds = validate_dataset(out, root, DataConfig())
    assert len(ds.samples) == 2 * 2 * 5  # 2 labels × 5 videos × 2 frames
    assert all(frames_root.resolve() in s.path.parents for s in ds.samples)
    for label, splits in VIDEOS.items():
        if label == "FF-F2F":
            continue
        for split, videos in splits.items():
            for video in videos:
                mine = [s for s in ds.samples if s.group == video]
                assert len(mine) == 2 and {s.split for s in mine} == {split}
                assert {s.label for s in mine} == {int(label != "FF-real")}
    assert not any("Face2Face" in str(s.path) for s in ds.samples)


def test_data_hash_does_not_depend_on_where_the_frames_live(bench, tmp_path):
    json_path, frames_root = bench
    root = tmp_path / "data" / "generators"
    a = import_deepfakebench(json_path, "FaceForensics++", frames_root, root / "a", labels=["FF-real", "FF-DF"])
    moved = tmp_path / "other-disk" / "rgb"
    shutil.copytree(frames_root, moved)
    root_b = tmp_path / "data2" / "generators"
    b = import_deepfakebench(json_path, "FaceForensics++", moved, root_b / "a", labels=["FF-real", "FF-DF"])
    hash_a = validate_dataset(a.parent, root, DataConfig()).data_hash
    assert validate_dataset(b.parent, root_b, DataConfig()).data_hash == hash_a


def test_df40_style_json_without_compression_level(tmp_path):
    frames_root = tmp_path / "df40"
    tree = {"simswap_Real": {}, "simswap_Fake": {}}
    for label in tree:
        for split, videos in {"train": ["a", "b"], "val": ["c"], "test": ["d"]}.items():
            entries = {}
            for v in videos:
                path = frames_root / label / v / "0.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8), (len(label) * 9 % 256, 40, 90)).save(path)
                entries[f"{label}-{v}"] = {"label": label, "frames": [str(path)]}  # absolute, inside the root
            tree[label][split] = entries
    json_path = tmp_path / "simswap_ff.json"
    json_path.write_text(json.dumps({"simswap_ff": tree}))
    samples = read_deepfakebench_json(json_path, "simswap_ff", frames_root)
    assert {(s.label, s.path.split("/")[0]) for s in samples} == {(0, "simswap_Real"), (1, "simswap_Fake")}
    assert all(not s.path.startswith("/") for s in samples)


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda t: t["FaceForensics++"]["FF-real"]["train"]["c23"]["000"].update(label="mystery"), "not in label_dict"),
        (lambda t: t["FaceForensics++"]["FF-real"]["test"]["c23"].update({"000": {"label": "FF-real", "frames": []}}),
         "'000' is in splits"),
        (lambda t: t["FaceForensics++"]["FF-real"]["val"]["c23"]["003"]["frames"].append("../../etc/passwd"), "escapes"),
        (lambda t: t["FaceForensics++"]["FF-real"]["val"]["c23"]["003"]["frames"].append("/elsewhere/x.png"),
         "outside --frames-root"),
        (lambda t: t["FaceForensics++"]["FF-real"].update(validation={}), "unknown split"),
    ],
)
def test_bad_json_is_refused_before_anything_is_written(bench, tmp_path, mutate, words):
    json_path, frames_root = bench
    tree = json.loads(json_path.read_text())
    mutate(tree)
    json_path.write_text(json.dumps(tree))
    out = tmp_path / "gen" / "df-ff"
    with pytest.raises(DatasetError, match=words):
        import_deepfakebench(json_path, "FaceForensics++", frames_root, out, labels=["FF-real", "FF-DF"])
    assert not (out / "generator.yaml").exists()


def test_missing_frame_one_class_and_unknown_names(bench, tmp_path):
    json_path, frames_root = bench
    out = tmp_path / "gen" / "df-ff"
    with pytest.raises(DatasetError, match="no dataset 'CelebDF'"):
        import_deepfakebench(json_path, "CelebDF", frames_root, out)
    with pytest.raises(DatasetError, match=r"no label\(s\) \['FF-XX'\]"):
        import_deepfakebench(json_path, "FaceForensics++", frames_root, out, labels=["FF-real", "FF-XX"])
    with pytest.raises(DatasetError, match="one class only"):
        import_deepfakebench(json_path, "FaceForensics++", frames_root, out, labels=["FF-DF", "FF-F2F"])
    missing = frames_root / "FaceForensics++/original_sequences/youtube/c23/frames/004/001.png"
    missing.unlink()
    with pytest.raises(DatasetError) as info:
        import_deepfakebench(json_path, "FaceForensics++", frames_root, out)
    assert info.value.path == missing and "missing" in str(info.value)
    assert not out.exists()


def test_cli_import_then_validate(bench, tmp_path, monkeypatch):
    json_path, frames_root = bench
    monkeypatch.setenv("R2M_PROJECT_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    from r2m.cli import app

    root = tmp_path / "data" / "generators"
    label_dict = tmp_path / "labels.yaml"
    label_dict.write_text("label_dict:\n  FF-real: 0\n  FF-DF: 1\n  FF-F2F: 1\n")
    runner = CliRunner()
    args = ["import-deepfakebench", str(json_path), "--dataset", "FaceForensics++", "--frames-root", str(frames_root),
            "--out", str(root / "ff-df"), "--family", "FS", "--domain", "ff", "--label", "FF-real", "--label", "FF-DF",
            "--label-dict", str(label_dict)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "20 frames of 10 videos" in result.stdout
    again = runner.invoke(app, args)  # never overwrites an existing dataset
    assert again.exit_code == 2 and "already exists" in again.output
    result = runner.invoke(app, ["validate", str(root)])
    assert result.exit_code == 0 and result.stdout.startswith("OK") and "ff-df" in result.stdout
