"""The data contract: discovery, manifest parsing, validation (one test per bad-input kind),
content hash, read-only validation, quarantine, shared real pools, and `r2m validate`."""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from r2m.config import DataConfig
from r2m.data import (
    FAKE,
    REAL,
    SPLITS,
    discover_datasets,
    load_manifest,
    quarantine,
    validate_data_root,
    validate_dataset,
)
from r2m.errors import DatasetError

CFG = DataConfig()


def write_image(path: Path, seed: int, size: int = 16, fmt: str | None = None) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def write_dataset(root: Path, name: str, *, groups: int = 6, per_group: int = 2, classes=("real", "fake"), **manifest) -> Path:
    """`root/name/` with `<class>/src<g>__<i>.png` images and a generator.yaml."""
    folder = root / name
    folder.mkdir(parents=True)
    seed = int(hashlib.sha256(name.encode()).hexdigest()[:6], 16)
    for c, label in enumerate(classes):
        for g in range(groups):
            for i in range(per_group):
                write_image(folder / label / f"src{g}__{i}.png", seed + 1000 * c + 10 * g + i)
    doc = {"name": name, "family": "FS", "domain": "ff", "role": "seen", **manifest}
    (folder / "generator.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return folder


def set_manifest(folder: Path, **changes) -> None:
    doc = yaml.safe_load((folder / "generator.yaml").read_text())
    doc.update(changes)
    (folder / "generator.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def rejected(folder: Path, root: Path, cfg: DataConfig = CFG) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        validate_dataset(folder, root, cfg)
    return info.value


def tree_state(folder: Path) -> dict[str, tuple[int, str]]:
    """Every entry under `folder` with its mtime and content hash (links by their target)."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                state[str(p)] = (0, os.readlink(p))
            elif p.is_file():
                state[str(p)] = (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return state


@pytest.fixture
def root(tmp_path) -> Path:
    r = tmp_path / "data" / "generators"
    r.mkdir(parents=True)
    return r


# --- a valid dataset -------------------------------------------------------------------------


def test_valid_dataset_has_both_classes_in_every_split(root):
    folder = write_dataset(root, "fs-ff")
    ds = validate_dataset(folder, root, CFG)
    assert (ds.name, ds.family, ds.domain, ds.role, ds.root) == ("fs-ff", "FS", "ff", "seen", folder)
    assert len(ds.samples) == 24
    for split in SPLITS:
        assert {s.label for s in ds.split(split)} == {REAL, FAKE}
    assert sum(len(ds.split(s)) for s in SPLITS) == len(ds.samples)
    assert {s.group for s in ds.samples} == {f"src{g}" for g in range(6)}
    assert all(s.path.is_file() and s.path.is_absolute() for s in ds.samples)
    assert len(ds.data_hash) == 64 and int(ds.data_hash, 16) >= 0


def test_discovery_lists_only_folders_with_a_manifest(root):
    write_dataset(root, "b-gen")
    write_dataset(root, "a-gen")
    (root / "incomplete" / "real").mkdir(parents=True)  # still being copied: no generator.yaml yet
    write_image(root / "incomplete" / "real" / "x.png", 1)
    (root / "stray.txt").write_text("not a dataset")
    assert discover_datasets(root) == [root / "a-gen", root / "b-gen"]
    assert discover_datasets(root / "missing") == []


def test_frame_folders_group_by_video(root):
    folder = root / "fr-cdf"
    for label in ("real", "fake"):
        for v in range(5):
            for n in range(3):
                write_image(folder / label / "frames" / f"{label}{v}" / f"{n}.png", 100 * v + n + (label == "fake"))
    (folder / "generator.yaml").write_text("name: fr-cdf\nfamily: FR\ndomain: cdf\nrole: seen\n")
    ds = validate_dataset(folder, root, CFG)
    assert {s.group for s in ds.samples} == {f"{c}{v}" for c in ("real", "fake") for v in range(5)}
    for group in {s.group for s in ds.samples}:
        assert len({s.split for s in ds.samples if s.group == group}) == 1


def test_shared_real_pool_is_used_instead_of_real(root):
    pool = root / "pools" / "ffhq"
    for g in range(6):
        write_image(pool / f"src{g}__0.png", 500 + g)
    a = write_dataset(root, "gen-a", classes=("fake",), real_source="pools/ffhq")
    b = write_dataset(root, "gen-b", classes=("fake",), real_source="pools/ffhq")
    da, db = validate_dataset(a, root, CFG), validate_dataset(b, root, CFG)
    real_a = sorted(s.path for s in da.samples if s.label == REAL)
    assert real_a == sorted(pool.glob("*.png")) == sorted(s.path for s in db.samples if s.label == REAL)
    assert discover_datasets(root) == [a, b]  # the pool folder itself is not a dataset


# --- the content hash ------------------------------------------------------------------------


def test_data_hash_is_content_based(root, tmp_path):
    folder = write_dataset(root, "fs-ff")
    first = validate_dataset(folder, root, CFG).data_hash
    assert validate_dataset(folder, root, CFG).data_hash == first
    other_root = tmp_path / "elsewhere" / "generators"
    shutil.copytree(folder, other_root / "fs-ff")  # another machine, another path: same content
    assert validate_dataset(other_root / "fs-ff", other_root, CFG).data_hash == first

    write_image(folder / "fake" / "src0__0.png", 999)  # one image changes
    changed_image = validate_dataset(folder, root, CFG).data_hash
    assert changed_image != first
    set_manifest(folder, notes="relabelled")  # the manifest changes
    assert validate_dataset(folder, root, CFG).data_hash not in {first, changed_image}


# --- malformed manifests ---------------------------------------------------------------------


def test_unknown_manifest_field_is_named(root):
    folder = write_dataset(root, "fs-ff", resolution=256)
    err = rejected(folder, root)
    assert err.path == folder / "generator.yaml"
    assert "unknown field 'resolution'" in str(err)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"family": "GAN"}, "'family'"),
        ({"role": "training"}, "'role'"),
        ({"name": "other-name"}, "differs from the folder name"),
        ({"real_source": "../outside"}, "'real_source'"),
        ({"splits": {"train": [0], "val": [], "test": []}}, "must be strings"),
    ],
)
def test_malformed_manifest_fields(root, change, words):
    folder = write_dataset(root, "fs-ff")
    set_manifest(folder, **change)
    err = rejected(folder, root)
    assert err.path == folder / "generator.yaml" and words in str(err)


def test_manifest_that_is_not_yaml_or_lacks_fields(root):
    folder = write_dataset(root, "fs-ff")
    (folder / "generator.yaml").write_text("name: [unclosed\n")
    assert "not valid YAML" in str(rejected(folder, root))
    (folder / "generator.yaml").write_text("name: fs-ff\nfamily: FS\n")
    assert "missing required field 'domain'" in str(rejected(folder, root))
    (folder / "generator.yaml").write_text("- just\n- a list\n")
    assert "expected a mapping" in str(rejected(folder, root))
    with pytest.raises(DatasetError, match="expected a mapping"):
        load_manifest(folder)  # the same check, without validating the images


# --- bad images --------------------------------------------------------------------------------


def test_text_file_named_png_is_not_an_image(root):
    folder = write_dataset(root, "fs-ff")
    bad = folder / "real" / "src1__0.png"
    bad.write_text("this is a text file, not a PNG")
    err = rejected(folder, root)
    assert err.path == bad and "not an image" in str(err)


def test_non_image_extension_is_rejected(root):
    folder = write_dataset(root, "fs-ff")
    (folder / "fake" / "notes.txt").write_text("hello")
    err = rejected(folder, root)
    assert err.path == folder / "fake" / "notes.txt" and "not an image file" in str(err)


@pytest.mark.parametrize("fmt, suffix", [("PNG", ".png"), ("JPEG", ".jpg"), ("WEBP", ".webp")])
def test_truncated_image_is_rejected(root, fmt, suffix):
    folder = write_dataset(root, "fs-ff")
    bad = write_image(folder / "fake" / f"src2__9{suffix}", 7, size=64, fmt=fmt)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) * 2 // 3])
    err = rejected(folder, root)
    assert err.path == bad and ("truncated" in str(err) or "not an image" in str(err))


def test_corrupt_png_chunk_is_rejected(root):
    folder = write_dataset(root, "fs-ff")
    bad = folder / "real" / "src3__1.png"
    data = bytearray(bad.read_bytes())
    data[60:80] = bytes(20)  # zero bytes inside IDAT: CRC mismatch
    bad.write_bytes(bytes(data))
    err = rejected(folder, root)
    assert err.path == bad and "corrupt" in str(err)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width × height with almost no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_rejected_from_its_header(root):
    folder = write_dataset(root, "fs-ff")
    bomb = folder / "fake" / "src4__5.png"
    bomb.write_bytes(_png_header_only(60_000, 60_000))  # 3.6 G pixels in ~100 bytes
    err = rejected(folder, root)
    assert err.path == bomb and "decompression bomb" in str(err)


def test_pixel_limit_comes_from_the_config(root):
    folder = write_dataset(root, "fs-ff")
    write_image(folder / "real" / "src5__7.png", 3, size=40)  # 1600 pixels, others 256
    err = rejected(folder, root, DataConfig(max_image_pixels=1000))
    assert err.path == folder / "real" / "src5__7.png"
    assert "decompression bomb" in str(err) and "max_image_pixels = 1000" in str(err)
    assert validate_dataset(folder, root, DataConfig(max_image_pixels=2000)).samples


# --- paths: symlinks and escapes -----------------------------------------------------------------


def test_symlinked_image_is_rejected(root, tmp_path):
    folder = write_dataset(root, "fs-ff")
    outside = write_image(tmp_path / "outside.png", 11)
    link = folder / "fake" / "src0__7.png"
    link.symlink_to(outside)
    err = rejected(folder, root)
    assert err.path == link and "symbolic link" in str(err)


def test_symlinked_folder_inside_dataset_is_rejected(root, tmp_path):
    folder = write_dataset(root, "fs-ff")
    target = tmp_path / "frames-elsewhere" / "v0"
    write_image(target / "0.png", 12)
    (folder / "fake" / "frames").mkdir()
    (folder / "fake" / "frames" / "v0").symlink_to(target, target_is_directory=True)
    err = rejected(folder, root)
    assert err.path == folder / "fake" / "frames" / "v0" and "symbolic link" in str(err)


def test_symlinked_dataset_folder_is_rejected(root, tmp_path):
    real_folder = write_dataset(tmp_path / "outside", "fs-ff")
    (root / "fs-ff").symlink_to(real_folder, target_is_directory=True)
    assert discover_datasets(root) == [root / "fs-ff"]  # discovered, then rejected with the reason
    err = rejected(root / "fs-ff", root)
    assert "symbolic link" in str(err)


def test_dataset_outside_the_data_root_is_rejected(root, tmp_path):
    folder = write_dataset(tmp_path / "outside", "fs-ff")
    err = rejected(folder, root)
    assert "escapes the data root" in str(err)


def test_real_source_through_a_symlink_is_rejected(root, tmp_path):
    pool = tmp_path / "pool-outside"
    for g in range(6):
        write_image(pool / f"src{g}__0.png", g)
    (root / "pool").symlink_to(pool, target_is_directory=True)
    folder = write_dataset(root, "gen-a", classes=("fake",), real_source="pool")
    err = rejected(folder, root)
    assert err.path == root / "pool" and "symbolic link" in str(err)


@pytest.mark.parametrize("bad_path", ["../other/x.png", "/etc/passwd", "fake/../../x.png"])
def test_sample_paths_escaping_samples_root_are_rejected(root, bad_path):
    folder = root / "listed"
    write_image(folder / "imgs" / "a.png", 1)
    samples = [{"path": "imgs/a.png", "label": 0}, {"path": bad_path, "label": 1}]
    (folder / "generator.yaml").write_text(
        yaml.safe_dump({"name": "listed", "family": "other", "domain": "x", "role": "seen", "samples": samples})
    )
    err = rejected(folder, root)
    assert err.path == folder / "generator.yaml" and "escapes samples_root" in str(err)


# --- classes and splits --------------------------------------------------------------------------


def test_one_class_dataset_is_rejected(root):
    folder = write_dataset(root, "fs-ff", classes=("real",))
    err = rejected(folder, root)
    assert err.path == folder and "one class only: no fake images" in str(err)
    (folder / "fake").mkdir()  # an empty fake/ is no better
    assert "one class only" in str(rejected(folder, root))


def test_split_without_both_classes_is_rejected(root):
    folder = write_dataset(root, "fs-ff", groups=2, per_group=4)  # 2 sources cannot fill 3 splits
    err = rejected(folder, root)
    assert err.path == folder and "split 'val' has no" in str(err)


def test_explicit_lists_with_an_empty_split_are_rejected(root):
    groups = [f"src{g}" for g in range(6)]
    folder = write_dataset(root, "fs-ff", splits={"train": groups[:5], "val": [], "test": groups[5:]})
    assert "split 'val' has no" in str(rejected(folder, root))


def test_unseen_dataset_needs_only_a_test_split(root):
    folder = root / "unseen-cdf"
    write_image(folder / "imgs" / "r.png", 1)
    write_image(folder / "imgs" / "f.png", 2)
    samples = [{"path": "imgs/r.png", "label": 0, "split": "test"}, {"path": "imgs/f.png", "label": 1, "split": "test"}]
    doc = {"name": "unseen-cdf", "family": "EFS", "domain": "cdf", "role": "unseen", "samples": samples}
    (folder / "generator.yaml").write_text(yaml.safe_dump(doc))
    ds = validate_dataset(folder, root, CFG)
    assert len(ds.split("test")) == 2 and ds.split("train") == [] and not ds.is_seen
    doc["role"] = "seen"  # a seen dataset must be able to train and validate
    (folder / "generator.yaml").write_text(yaml.safe_dump(doc))
    assert "split 'train' has no" in str(rejected(folder, root))


# --- read-only validation, quarantine, the CLI ---------------------------------------------------


def test_validation_never_changes_files(root, tmp_path):
    good = write_dataset(root, "good")
    bad = write_dataset(root, "bad")
    (bad / "fake" / "src0__0.png").write_bytes(b"GIF89a garbage")
    (bad / "real" / "link.png").symlink_to(tmp_path)
    before = tree_state(root)
    results = dict(validate_data_root(root, CFG))
    assert isinstance(results[bad], DatasetError) and not isinstance(results[good], DatasetError)
    assert tree_state(root) == before


def test_quarantine_moves_the_whole_dataset_with_its_reason(root):
    folder = write_dataset(root, "bad-gen")
    (folder / "fake" / "src0__0.png").write_text("nope")
    err = rejected(folder, root)
    dest = quarantine(folder, root, str(err))
    assert not folder.exists() and discover_datasets(root) == []
    assert dest.parent == root.parent / "quarantine" and dest.name.startswith("bad-gen-")
    assert (dest / "bad-gen" / "generator.yaml").is_file()
    assert "not an image" in (dest / "REASON.txt").read_text()
    again = write_dataset(root, "bad-gen")  # the same name can be quarantined twice
    assert quarantine(again, root, "second time") != dest


def test_cli_validate_reports_each_dataset_and_exits_2(root, monkeypatch, tmp_path):
    monkeypatch.setenv("R2M_PROJECT_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    from r2m.cli import app

    write_dataset(root, "good")
    bad = write_dataset(root, "bad", classes=("real",))
    runner = CliRunner()
    result = runner.invoke(app, ["validate", str(root)])
    assert result.exit_code == 2
    lines = result.stdout.splitlines()
    assert any(line.startswith("OK") and "good" in line for line in lines)
    assert any(line.startswith("REJECTED") and "bad" in line and "one class only" in line for line in lines)
    shutil.rmtree(bad)
    result = runner.invoke(app, ["validate", str(root)])
    assert result.exit_code == 0 and "OK" in result.stdout


def test_explicit_sample_list_must_name_every_image_in_the_dataset(root):
    folder = write_dataset(root, "listed", groups=3, per_group=1)
    samples = [
        {"path": f"{label}/src{g}__0.png", "label": int(label == "fake"), "split": SPLITS[g]}
        for label in ("real", "fake") for g in range(3)
    ]
    set_manifest(folder, samples=samples)
    ds = validate_dataset(folder, root, CFG)
    assert {s.group: s.split for s in ds.samples} == {"src0": "train", "src1": "val", "src2": "test"}
    extra = write_image(folder / "fake" / "src9__0.png", 77)  # an image the list forgot
    err = rejected(folder, root)
    assert err.path == extra and "not listed" in str(err)
