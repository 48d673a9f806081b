"""Deterministic, leak-free train/val/test splits.

The unit of splitting is the *group*: the video id for frames (`frames/<video_id>/<n>.png`), and
for loose images the source id, i.e. the file stem up to the first `__` (`astronaut__crop07.png`
belongs to `astronaut`). A group never straddles two splits, so frames of one video or crops of
one photograph cannot leak from train into test.

Groups are ranked by sha256(split seed, group id) and cut at the configured fractions, separately
per *stratum* (the set of classes a group holds), so small datasets still get real and fake
images in every split. Explicit assignments (manifest `splits` lists, per-sample `split`) win.
An unseen (evaluation-only) dataset without them is all test (docs/architecture.md, "Data contract").
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import PurePosixPath

SPLITS: tuple[str, ...] = ("train", "val", "test")


def group_of(rel_path: str | PurePosixPath) -> str:
    """The group id of an image path (relative, POSIX): video id for frames, else the source id."""
    parts = PurePosixPath(rel_path).parts
    for i, part in enumerate(parts[:-2]):
        if part == "frames":
            return parts[i + 1]
    stem = PurePosixPath(rel_path).stem
    return stem.split("__", 1)[0] or stem


def group_rank_key(group: str, seed: int) -> str:
    """The hash a group is ranked by; depends on nothing but the group id and the seed."""
    return hashlib.sha256(f"{seed}\0{group}".encode()).hexdigest()


def split_sizes(n: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """How many of `n` groups go to each split: largest remainder of n·fraction, each split ≥ 1.

    With fewer than three groups not every split can be served; test is filled first (then
    train) so that evaluation-only datasets keep a usable test split.
    """
    if n < 3:
        return {"train": int(n >= 2), "val": 0, "test": int(n >= 1)}
    raw = {s: n * fractions[s] for s in SPLITS}
    sizes = {s: int(raw[s]) for s in SPLITS}
    by_remainder = sorted(SPLITS, key=lambda s: (-(raw[s] - sizes[s]), SPLITS.index(s)))
    for s in by_remainder[: n - sum(sizes.values())]:
        sizes[s] += 1
    for s in SPLITS:
        if sizes[s] == 0:
            donor = max(SPLITS, key=lambda t: sizes[t])
            sizes[donor] -= 1
            sizes[s] = 1
    return sizes


def hashed_splits(
    groups: Iterable[str], fractions: Mapping[str, float], seed: int
) -> dict[str, str]:
    """Assign groups to splits by their rank under `group_rank_key`, cut at `fractions`."""
    ranked = sorted(set(groups), key=lambda g: (group_rank_key(g, seed), g))
    sizes = split_sizes(len(ranked), fractions)
    assignment: dict[str, str] = {}
    start = 0
    for split in SPLITS:
        for group in ranked[start : start + sizes[split]]:
            assignment[group] = split
        start += sizes[split]
    return assignment


def explicit_splits(lists: Mapping[str, Iterable[str]]) -> dict[str, str]:
    """Group → split from explicit lists; a group listed in two splits is an error."""
    assignment: dict[str, str] = {}
    for split in SPLITS:
        for group in lists.get(split, ()):
            if assignment.get(group, split) != split:
                raise ValueError(f"group '{group}' is listed in both '{assignment[group]}' and '{split}'")
            assignment[group] = split
    return assignment


def _preview(items: Iterable[str], limit: int = 5) -> str:
    items = sorted(items)
    more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(repr(i) for i in items[:limit]) + more


def assign_splits(
    group_labels: Mapping[str, set[int]],
    fractions: Mapping[str, float],
    seed: int,
    *,
    lists: Mapping[str, Iterable[str]] | None = None,
    fixed: Mapping[str, str] | None = None,
    evaluation_only: bool = False,
) -> dict[str, str]:
    """Split every group of a dataset.

    `group_labels` maps each group to the classes its images have. `fixed` holds splits already
    decided per group (from per-sample `split` fields); `lists` are the manifest's explicit split
    lists. Explicit beats hashed: with `lists`, every group not fixed must be listed (the error
    names the ones that are not), and a group listed but absent from the data is an error too.
    Without `lists`, the remaining groups are hashed per stratum of classes, or, for an
    `evaluation_only` (unseen) dataset, all go to test: nothing of it trains or chooses anything.
    """
    fixed = dict(fixed or {})
    if lists is not None:
        listed = explicit_splits(lists)
        unknown = set(listed) - set(group_labels)
        if unknown:
            raise ValueError(f"splits lists name groups with no images: {_preview(unknown)}")
        for group, split in listed.items():
            if fixed.get(group, split) != split:
                raise ValueError(f"group '{group}' is in split '{fixed[group]}' by its samples but listed in '{split}'")
        fixed.update(listed)
        missing = set(group_labels) - set(fixed)
        if missing:
            raise ValueError(f"groups not listed in the manifest's splits: {_preview(missing)}")
        return fixed
    if evaluation_only:
        return {group: fixed.get(group, "test") for group in group_labels}
    strata: dict[tuple[int, ...], list[str]] = {}
    for group, labels in group_labels.items():
        if group not in fixed:
            strata.setdefault(tuple(sorted(labels)), []).append(group)
    assignment = dict(fixed)
    for stratum in sorted(strata):
        assignment.update(hashed_splits(strata[stratum], fractions, seed))
    return assignment
