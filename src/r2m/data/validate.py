"""Validation of generator datasets against the data contract (docs/architecture.md, "Data contract").

`validate_dataset` is read-only: it never moves or changes a file. It raises `DatasetError`
naming the file at fault for corrupt/truncated images, non-images, decompression bombs,
symlinks, paths escaping the data root (or `samples_root`), one-class datasets, empty splits
and malformed manifests. The continual loop then calls `quarantine`, so a rejected dataset is
reported and moved aside whole, never half ingested.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from r2m.config import DataConfig
from r2m.data.generator import FAKE, REAL, GeneratorDataset, Sample
from r2m.data.images import decode_image
from r2m.data.manifest import MANIFEST_NAME, GeneratorManifest, is_plain_relative, discover_datasets, load_manifest
from r2m.data.splits import SPLITS, assign_splits, group_of
from r2m.errors import DatasetError

CLASS_DIRS = {"real": REAL, "fake": FAKE}
HASH_VERSION = "r2m-data-v1"


@dataclass(frozen=True)
class _Candidate:
    """An image found on disk before its split is known; `key` is its machine-independent name."""

    path: Path
    key: str
    label: int
    group: str
    split: str | None = None


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _reject_links(folder: Path) -> None:
    """Every entry below `folder` must be a regular file or folder: no symlinks, fifos, devices."""
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise DatasetError(path, "is a symbolic link; datasets must hold regular files only")
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise DatasetError(path, "is not a regular file or folder")


def _check_no_link_below(base: Path, rel: PurePosixPath, checked: set[Path]) -> Path:
    """`base/rel`, after checking that no component below `base` is a symlink."""
    path = base
    for part in rel.parts:
        path = path / part
        if path in checked:
            continue
        if path.is_symlink():
            raise DatasetError(path, "is a symbolic link; datasets must hold regular files only")
        checked.add(path)
    return path


def _check_extension(path: Path, extensions: Iterable[str]) -> None:
    if path.suffix.lower() not in extensions:
        raise DatasetError(path, f"not an image file: extension '{path.suffix}' is not one of {', '.join(extensions)}")


def _scan_class_dir(class_dir: Path, label: int, key_prefix: str, extensions: tuple[str, ...]) -> Iterator[_Candidate]:
    """Loose images `<class>/*.png` and frame folders `<class>/frames/<video_id>/<n>.png`."""
    if not class_dir.exists():
        return
    if not class_dir.is_dir():
        raise DatasetError(class_dir, "must be a folder of images")

    def visible(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))

    def candidate(path: Path) -> _Candidate:
        _check_extension(path, extensions)
        rel = path.relative_to(class_dir).as_posix()
        return _Candidate(path, f"{key_prefix}{rel}", label, group_of(rel))

    for entry in visible(class_dir):
        if not entry.is_dir():
            yield candidate(entry)
            continue
        if entry.name != "frames":
            raise DatasetError(entry, "unexpected folder: images go in real/ and fake/ or in frames/<video_id>/")
        for video in visible(entry):
            if not video.is_dir():
                raise DatasetError(video, "frames/ must hold one folder per video id: frames/<video_id>/<n>.png")
            for frame in visible(video):
                if frame.is_dir():
                    raise DatasetError(frame, "unexpected folder inside the frames of a video")
                yield candidate(frame)


def _real_pool(manifest: GeneratorManifest, dataset_dir: Path, data_root: Path) -> Path:
    """The shared real pool `<data_root>/<real_source>`: inside the data root, no symlinks."""
    source = dataset_dir / MANIFEST_NAME
    if (dataset_dir / "real").exists():
        raise DatasetError(dataset_dir / "real", "real_source is set in generator.yaml as well: keep one of the two")
    pool = _check_no_link_below(data_root, PurePosixPath(manifest.real_source), set())
    if not _inside(pool.resolve(), data_root):
        raise DatasetError(source, f"real_source '{manifest.real_source}' escapes the data root {data_root}")
    if not pool.is_dir():
        raise DatasetError(source, f"real_source '{manifest.real_source}': no such folder under {data_root}")
    _reject_links(pool)
    return pool


def _folder_samples(manifest: GeneratorManifest, dataset_dir: Path, data_root: Path, data_cfg: DataConfig) -> list[_Candidate]:
    extensions = tuple(e.lower() for e in data_cfg.extensions)
    if manifest.real_source is not None:
        pool = _real_pool(manifest, dataset_dir, data_root)
        prefix = f"@data_root/{PurePosixPath(manifest.real_source).as_posix()}/"  # never clashes with real/, fake/
        real = _scan_class_dir(pool, REAL, prefix, extensions)
    else:
        real = _scan_class_dir(dataset_dir / "real", REAL, "real/", extensions)
    return [*real, *_scan_class_dir(dataset_dir / "fake", FAKE, "fake/", extensions)]


def _listed_samples(manifest: GeneratorManifest, dataset_dir: Path, data_cfg: DataConfig) -> list[_Candidate]:
    """The manifest's explicit `samples`, relative to `samples_root` (or the dataset folder)."""
    source = dataset_dir / MANIFEST_NAME
    if manifest.samples_root:
        for name in CLASS_DIRS:
            if (dataset_dir / name).exists():
                raise DatasetError(dataset_dir / name, "generator.yaml lists samples under samples_root: remove this folder")
    base = Path(manifest.samples_root) if manifest.samples_root else dataset_dir
    if not base.is_dir():
        raise DatasetError(source, f"samples_root '{base}': no such folder")
    base = base.resolve()
    extensions = tuple(e.lower() for e in data_cfg.extensions)
    checked: set[Path] = set()
    seen: set[str] = set()
    out = []
    for i, entry in enumerate(manifest.samples or ()):
        if not is_plain_relative(entry.path):
            raise DatasetError(source, f"samples[{i}].path '{entry.path}' escapes samples_root (absolute or '..')")
        rel = PurePosixPath(entry.path)
        if rel.as_posix() in seen:
            raise DatasetError(source, f"samples[{i}].path '{entry.path}' is listed twice")
        seen.add(rel.as_posix())
        path = _check_no_link_below(base, rel, checked)
        if not path.is_file():
            raise DatasetError(path, "listed in generator.yaml but not a file on disk")
        _check_extension(path, extensions)
        group = entry.group if entry.group is not None else group_of(rel)
        out.append(_Candidate(path, rel.as_posix(), entry.label, group, entry.split))
    if not manifest.samples_root:
        _check_all_listed(dataset_dir, {c.path for c in out})
    return out


def _check_all_listed(dataset_dir: Path, listed: set[Path]) -> None:
    """An explicit list is the whole dataset: an image left out of it is an error, not ignored."""
    for name in CLASS_DIRS:
        for path in sorted((dataset_dir / name).rglob("*")):
            if path.is_file() and not path.name.startswith(".") and path.resolve() not in listed:
                raise DatasetError(path, "not listed in generator.yaml's samples (an explicit list must name every image)")


def _split_candidates(candidates: list[_Candidate], manifest: GeneratorManifest, dataset_dir: Path, data_cfg: DataConfig) -> list[Sample]:
    group_labels: dict[str, set[int]] = {}
    fixed: dict[str, str] = {}
    for c in candidates:
        group_labels.setdefault(c.group, set()).add(c.label)
        if c.split is not None:
            if fixed.setdefault(c.group, c.split) != c.split:
                raise DatasetError(
                    dataset_dir / MANIFEST_NAME,
                    f"group '{c.group}' straddles splits '{fixed[c.group]}' and '{c.split}' (a leak)",
                )
    lists = manifest.splits.model_dump() if manifest.splits is not None else None
    try:
        assignment = assign_splits(group_labels, data_cfg.split_fractions, data_cfg.split_seed, lists=lists, fixed=fixed,
                                   evaluation_only=manifest.role == "unseen")
    except ValueError as err:
        raise DatasetError(dataset_dir / MANIFEST_NAME, str(err)) from None
    return [Sample(c.path, c.label, c.group, assignment[c.group]) for c in candidates]


def _check_classes_and_splits(samples: list[Sample], role: str, dataset_dir: Path) -> None:
    """Both classes overall; both classes in every split a stage reads (AUC needs two classes).

    Seen datasets need train, val and test; unseen ones are evaluation-only and need test.
    """
    labels = {s.label for s in samples}
    if REAL not in labels:
        raise DatasetError(dataset_dir, "one class only: no real images (real/, real_source or samples)")
    if FAKE not in labels:
        raise DatasetError(dataset_dir, "one class only: no fake images (fake/ or samples)")
    needed = SPLITS if role == "seen" else ("test",)
    for split in needed:
        present = {s.label for s in samples if s.split == split}
        for label, word in ((REAL, "real"), (FAKE, "fake")):
            if label not in present:
                groups = sorted({s.group for s in samples if s.label == label})
                n = sum(s.label == label for s in samples)
                shown = ", ".join(f"'{g}'" for g in groups[:3]) + (f" ... (+{len(groups) - 3} more)" if len(groups) > 3 else "")
                raise DatasetError(
                    dataset_dir,
                    f"split '{split}' has no {word} images: the {n} {word} image(s) form {len(groups)} group(s) "
                    f"({shown}) and a group never straddles splits; a group is the video folder of "
                    f"frames/<video_id>/ or the file name up to the first '__' (<source>__<n>.png). "
                    f"A {role} dataset needs both classes in {', '.join(needed)}: name files "
                    f"<source>__<n> by their source, add sources, or list splits in generator.yaml",
                )


def _check_images(candidates: list[_Candidate], data_cfg: DataConfig, name: str) -> dict[str, str]:
    """Decode every image fully; return key → sha256 of its bytes (read once for both)."""
    hashes = {}
    for c in tqdm(candidates, desc=f"validate {name}", unit="img", leave=False, disable=None):
        try:
            data = c.path.read_bytes()
        except OSError as err:
            raise DatasetError(c.path, f"cannot read: {err.strerror or err}") from None
        decode_image(data, c.path, data_cfg.max_image_pixels, data_cfg.formats)
        hashes[c.key] = hashlib.sha256(data).hexdigest()
    return hashes


def data_hash(manifest: GeneratorManifest, samples: Iterable[tuple[str, int, str, str, str]]) -> str:
    """sha256 over the manifest and sorted (relative path, label, group, split, file sha256).

    The manifest enters as canonical JSON without `samples_root` (a machine-specific absolute
    folder) and without `samples` (whose every field is in the per-sample lines), so the hash is
    the same on every machine holding the same content.
    """
    h = hashlib.sha256(HASH_VERSION.encode() + b"\0")
    canonical = manifest.model_dump(mode="json", exclude={"samples_root", "samples"})
    h.update(json.dumps(canonical, sort_keys=True).encode() + b"\0")
    for key, label, group, split, digest in sorted(samples):
        h.update(f"{key}\t{label}\t{group}\t{split}\t{digest}\n".encode())
    return h.hexdigest()


def validate_dataset(dataset_dir: Path | str, data_root: Path | str, data_cfg: DataConfig | None = None) -> GeneratorDataset:
    """Check one generator dataset against the data contract; read-only.

    Returns the `GeneratorDataset` with its samples, splits and content hash, or raises
    `DatasetError(path, reason)` naming the file at fault. Cheap structural checks run first,
    then every image is decoded in full.
    """
    data_cfg = data_cfg or DataConfig()
    root = Path(data_root).resolve()
    folder = Path(os.path.abspath(dataset_dir))
    if folder.is_symlink():
        raise DatasetError(folder, "is a symbolic link; a dataset must be a folder inside the data root")
    if not folder.is_dir():
        raise DatasetError(folder, "no such dataset folder")
    if root not in folder.resolve().parents:
        raise DatasetError(folder, f"escapes the data root {root}")
    manifest = load_manifest(folder)
    _reject_links(folder)
    if manifest.samples is not None:
        candidates = _listed_samples(manifest, folder, data_cfg)
    else:
        candidates = _folder_samples(manifest, folder, root, data_cfg)
    samples = _split_candidates(candidates, manifest, folder, data_cfg)
    _check_classes_and_splits(samples, manifest.role, folder)
    digests = _check_images(candidates, data_cfg, manifest.name)
    keyed = [(c.key, s.label, s.group, s.split, digests[c.key]) for c, s in zip(candidates, samples)]
    order = sorted(range(len(samples)), key=lambda i: keyed[i][0])
    return GeneratorDataset(
        name=manifest.name,
        family=manifest.family,
        domain=manifest.domain,
        role=manifest.role,
        root=folder,
        samples=tuple(samples[i] for i in order),
        data_hash=data_hash(manifest, keyed),
        manifest=manifest,
    )


def validate_data_root(data_root: Path | str, data_cfg: DataConfig | None = None) -> list[tuple[Path, GeneratorDataset | DatasetError]]:
    """Validate every discovered dataset; each entry is its folder and the dataset or the error."""
    results: list[tuple[Path, GeneratorDataset | DatasetError]] = []
    for folder in discover_datasets(data_root):
        try:
            results.append((folder, validate_dataset(folder, data_root, data_cfg)))
        except DatasetError as err:
            results.append((folder, err))
    return results


def quarantine(dataset_dir: Path | str, data_root: Path | str, reason: str) -> Path:
    """Move a rejected dataset aside, whole: `<data_root>/../quarantine/<name>-<UTC time>/`.

    The folder lands as `<that>/<name>/` next to a `REASON.txt`; the returned path is
    `<data_root>/../quarantine/<name>-<UTC time>`. Frames used in place through `samples_root`
    stay where they are (only the dataset folder moves).
    """
    root = Path(os.path.abspath(data_root))
    src = Path(os.path.abspath(dataset_dir))
    if root not in src.parents:
        raise DatasetError(src, f"cannot quarantine: not inside the data root {root}")
    if not (src.exists() or src.is_symlink()):
        raise DatasetError(src, "cannot quarantine: no such dataset folder")
    now = datetime.now(timezone.utc)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    qroot = root.parent / "quarantine"
    dest = qroot / f"{src.name}-{stamp}"
    n = 1
    while dest.exists():
        dest = qroot / f"{src.name}-{stamp}-{n}"
        n += 1
    dest.mkdir(parents=True)
    shutil.move(str(src), str(dest / src.name))  # a symlink is moved as the link itself
    (dest / "REASON.txt").write_text(f"{reason}\n\ndataset: {src}\nquarantined: {now.isoformat()}\n")
    return dest
