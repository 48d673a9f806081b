"""A validated generator dataset: its samples, their splits and a content hash."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from r2m.data.manifest import GeneratorManifest
from r2m.data.splits import SPLITS

REAL, FAKE = 0, 1


@dataclass(frozen=True)
class Sample:
    """One image: absolute path, label (1 = fake, 0 = real), group (video / source id), split."""

    path: Path
    label: int
    group: str
    split: str


@dataclass(frozen=True)
class GeneratorDataset:
    """The result of `validate_dataset`: everything downstream stages need about one generator.

    `data_hash` is the sha256 of the manifest bytes and every (relative path, label, split,
    file sha256): it identifies the content, is the same on every machine, and changes when
    any image or the manifest changes. Specialists record it.
    """

    name: str
    family: str
    domain: str
    role: str
    root: Path
    samples: tuple[Sample, ...]
    data_hash: str
    manifest: GeneratorManifest | None = field(default=None, compare=False, repr=False)

    def split(self, name: str) -> list[Sample]:
        """The samples of split `name` ("train", "val" or "test")."""
        if name not in SPLITS:
            raise ValueError(f"unknown split '{name}' (expected one of {', '.join(SPLITS)})")
        return [s for s in self.samples if s.split == name]

    def counts(self) -> dict[str, dict[str, int]]:
        """{split: {"real": n, "fake": n}} for reports."""
        out = {s: {"real": 0, "fake": 0} for s in SPLITS}
        for s in self.samples:
            out[s.split]["fake" if s.label == FAKE else "real"] += 1
        return out

    @property
    def is_seen(self) -> bool:
        """Seen datasets train specialists; unseen ones are evaluation-only (paper Protocol 3)."""
        return self.role == "seen"


def balanced_sample(samples: Sequence[Sample], n: int, seed: int = 0) -> list[Sample]:
    """Up to `n` of `samples`, half real and half fake (deterministic for a seed), so an AUC on
    them is defined: the export's parity sample and the int8 calibration images."""
    rng = np.random.default_rng(seed)
    picked: list[Sample] = []
    for label in (REAL, FAKE):
        pool = sorted((s for s in samples if s.label == label), key=lambda s: str(s.path))
        take = min(len(pool), n // 2)
        picked += [pool[i] for i in sorted(rng.choice(len(pool), size=take, replace=False))] if take else []
    return picked
