"""Write the embedded benchmark: one generator dataset per (family, real domain), in the data
contract (`<out>/<name>/generator.yaml`, `real/`, `fake/`).

The benchmark ships its own protocol splits, as public benchmarks do (FF++, DF40's JSON files):
each seen dataset's *sources* (photographs or photo regions) are cut into train/val/test at
`split_fractions` by the contract's hash of the source id, and each split gets its exact share
of the images, drawn round-robin from that split's sources only. The manifest lists the sources
of every split (`splits:`), so validation and test images come from sources disjoint from
training, and their sizes are exact (640 per class gives 320 / 160 / 160). An unseen dataset is
evaluation-only: all its sources and images are test.

For every index i the builder draws two crops of the same source region: one is saved as real,
the other goes through the family's artifact and is saved as fake. Real and fake images thus come
from the same sources in the same numbers, through the same resize and the same PNG encoder: the
artifact is the only difference. Files are named `<source id>__<n>.png`, so the data contract's
splitter keeps all crops of one source region in one split (no pixel is shared across splits).

Deterministic: a dataset's bytes depend only on (seed, dataset name, sizes, split fractions,
image size, strength) and the package versions (numpy, scipy, scikit-image, Pillow/zlib).
"""

from __future__ import annotations

import shutil
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from r2m.data.demo.families import FAMILIES, Family
from r2m.data.demo.sources import DOMAINS, domain_sources, sample_crop
from r2m.data.manifest import MANIFEST_NAME, GeneratorManifest, SplitLists, dump_manifest, load_manifest
from r2m.data.splits import SPLITS, hashed_splits
from r2m.errors import DatasetError

DEFAULT_SPLIT_FRACTIONS = {"train": 0.5, "val": 0.25, "test": 0.25}

MARKER = "built by r2m demo-data"  # in `notes`: lets a rebuild replace its own folders only


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of the benchmark: a family's fakes over one real domain."""

    family: str  # key of FAMILIES
    domain: str  # one of DOMAINS

    @property
    def name(self) -> str:
        return f"{self.family}-{self.domain}"


# Seen families in both domains (Protocol 1 same-domain, Protocol 2 cross-domain); unseen
# families in both domains too (Protocol 3).
DATASETS: tuple[DatasetSpec, ...] = tuple(DatasetSpec(f, d) for f in FAMILIES for d in DOMAINS)


def dataset_rng(seed: int, name: str) -> np.random.Generator:
    """The one random stream of a dataset, independent of the other datasets and of build order."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def to_uint8_rgb(img: np.ndarray) -> np.ndarray:
    """float [H, W, C] in [0, 1] → uint8 [H, W, 3] (grey replicated: every file is RGB)."""
    out = np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.repeat(out, 3, axis=2) if out.shape[2] == 1 else out


def save_png(img: np.ndarray, path: Path) -> None:
    """PNG with fixed encoder settings and no metadata, so the bytes are reproducible."""
    Image.fromarray(to_uint8_rgb(img), mode="RGB").save(path, format="PNG", compress_level=6)


def _notes(spec: DatasetSpec, family: Family, counts: dict[str, int], seed: int, image_size: int, strength: float) -> str:
    variants = ", ".join(v.__name__ for v in family.variants)
    per_split = ", ".join(f"{split} {n}" for split, n in counts.items() if n)
    return (
        f"{MARKER} (seed {seed}, per class: {per_split}; {image_size} px, strength {strength:g}). "
        f"{family.code} family '{family.key}': {family.description}; variants: {variants}. "
        f"Real domain '{spec.domain}': crops of photographs bundled with scikit-image, scikit-learn "
        f"and matplotlib; files are <source id>__<n>.png and a source never straddles splits."
    )


def _owned_by_demo(folder: Path) -> bool:
    try:
        return MARKER in load_manifest(folder).notes
    except DatasetError:
        return False


def split_counts(size: int, fractions: dict[str, float]) -> dict[str, int]:
    """Images per class in each split: largest remainder of size·fraction (they sum to `size`)."""
    raw = {split: size * fractions[split] for split in SPLITS}
    counts = {split: int(raw[split]) for split in SPLITS}
    by_remainder = sorted(SPLITS, key=lambda sp: (-(raw[sp] - counts[sp]), SPLITS.index(sp)))
    for split in by_remainder[: size - sum(counts.values())]:
        counts[split] += 1
    return counts


def build_dataset(
    spec: DatasetSpec, out: Path | str, size: int, seed: int, image_size: int, strength: float = 1.0,
    split_fractions: dict[str, float] | None = None,
) -> Path:
    """Write one dataset under ``out``; returns its folder.

    ``size`` images per class; a seen dataset's are shared among train/val/test at
    ``split_fractions`` (default 50/25/25), each split's drawn from its own sources only.
    The folder is written under a hidden temporary name and renamed at the end, so a watcher
    never sees a half-written dataset. An existing folder is replaced only if an earlier
    `r2m demo-data` wrote it.
    """
    family = FAMILIES[spec.family]
    out = Path(out)
    target = out / spec.name
    if target.exists() and not _owned_by_demo(target):
        raise DatasetError(target, "exists and was not built by r2m demo-data; remove it or pick another --out")
    tmp = out / f".{spec.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "real").mkdir(parents=True)
    (tmp / "fake").mkdir()

    rng = dataset_rng(seed, spec.name)
    pool = domain_sources(spec.domain)
    if family.role == "unseen":  # evaluation-only (Protocol 3): every source and image is test
        of_split = {source.id: "test" for source in pool}
        quota = {"train": 0, "val": 0, "test": size}
    else:
        fractions = dict(split_fractions or DEFAULT_SPLIT_FRACTIONS)
        of_split = hashed_splits([source.id for source in pool], fractions, seed)
        quota = split_counts(size, fractions)
    used: dict[str, dict[str, int]] = {split: {} for split in SPLITS}  # split -> source id -> crops
    for split in SPLITS:
        members = [source for source in pool if of_split[source.id] == split]
        order = rng.permutation(len(members))
        for i in range(quota[split]):
            source = members[order[i % len(members)]]  # round-robin over this split's sources
            n = used[split][source.id] = used[split].get(source.id, -1) + 1
            real = sample_crop(source, rng, image_size)
            fake, _ = family.make_fake(sample_crop(source, rng, image_size), rng, strength)
            save_png(real, tmp / "real" / f"{source.id}__{n:04d}.png")
            save_png(fake, tmp / "fake" / f"{source.id}__{n:04d}.png")

    manifest = GeneratorManifest(
        name=spec.name,
        family=family.code,
        domain=spec.domain,
        role=family.role,
        splits=SplitLists(**{split: sorted(used[split]) for split in SPLITS}),
        notes=_notes(spec, family, quota, seed, image_size, strength),
    )
    dump_manifest(manifest, tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def _build_one(args: tuple) -> tuple[str, float]:
    t0 = time.perf_counter()
    build_dataset(*args)
    return args[0].name, time.perf_counter() - t0


def build_demo_data(
    out: Path | str,
    size: int,
    seed: int,
    image_size: int,
    strength: float = 1.0,
    *,
    unseen_size: int | None = None,
    split_fractions: dict[str, float] | None = None,
    datasets: tuple[DatasetSpec, ...] = DATASETS,
    workers: int = 2,
    progress: bool = True,
) -> list[Path]:
    """Build every dataset of the benchmark under ``out`` (``workers`` processes); returns their folders.

    ``size`` images per class per seen dataset (cut at ``split_fractions``), ``unseen_size``
    (default ``size``) per class per unseen, evaluation-only set."""
    unseen_size = size if unseen_size is None else unseen_size
    if size < 1 or unseen_size < 1:
        raise DatasetError(out, f"--size and --unseen-size must be at least 1 (got {size}, {unseen_size})")
    if image_size < 16:
        raise DatasetError(out, f"--image-size must be at least 16 px (got {image_size})")
    if not strength > 0:
        raise DatasetError(out, f"--strength must be positive (got {strength})")
    out = Path(out)
    for spec in datasets:  # refuse before writing anything, not half-way through
        if (out / spec.name).exists() and not _owned_by_demo(out / spec.name):
            raise DatasetError(out / spec.name, "exists and was not built by r2m demo-data; remove it or pick another --out")
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(spec, out, unseen_size if FAMILIES[spec.family].role == "unseen" else size, seed, image_size, strength,
             split_fractions) for spec in datasets]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc="demo-data", unit="dataset", disable=not progress)
    if workers <= 1:
        for job in jobs:
            name, _ = _build_one(job)
            bar.set_postfix_str(name)
            bar.update()
    else:
        import multiprocessing

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
            for name, _ in ex.map(_build_one, jobs):
                bar.set_postfix_str(name)
                bar.update()
    bar.close()
    return [out / spec.name for spec in datasets]


__all__ = ["DATASETS", "DEFAULT_SPLIT_FRACTIONS", "MANIFEST_NAME", "DatasetSpec", "build_dataset", "build_demo_data", "split_counts"]
