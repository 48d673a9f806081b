"""Hierarchical R²M: group related specialists, merge each group, then R²M over the groups
(the paper's §5 "hierarchical, self-expanding merging"; docs/method.md, "Hierarchical merging").

With groups G_1..G_K of the specialists (by forgery family by default) and θ0 shared:

    level 1   τ_G = τ_i                                  |G| = 1 (a group of one is its specialist)
              τ_G = (τ_a + τ_b) / 2                      |G| = 2 (R²M's residual vanishes for two:
                                                                  their mean is what it keeps)
              τ_G = R²M(θ0, G; α₁, r₁, core₁) − θ0       |G| ≥ 3
    level 2   θ* = R²M(θ0, {θ0 + τ_G}; α, r, core)       K ≥ 3
              θ* = θ0 + (τ_G1 + τ_G2) / 2                K = 2 (the same rule as a group of two)
              θ* = θ0 + τ_G1                             K = 1
    heads and BatchNorm statistics: the mean over all N specialists (as flat merging)

Degenerate cases: every specialist in one group gives that group's level-1 merge; every group a
singleton gives flat R²M (both tested). Each level streams like the flat merge: a group model is
written key by key to a temporary safetensors file beside the output, level 2 reads those files
as its specialists, so no more than the flat R²M's buffers is ever in memory.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch

from r2m.errors import MergeError
from r2m.merging.r2m import r2m, r2m_points
from r2m.merging.stream import DiskScratch, SafetensorsSink, SafetensorsSource, as_source
from r2m.merging.taskvectors import MergeResult, Runtime, TaskVectors
from r2m.merging.wa import average

LEVEL2_PAIR = "mean of the two"  # what a level with exactly two members does (documented above)


@dataclass(frozen=True)
class Grouping:
    """Group name -> the indices (into the specialists, in input order) of its members; groups in
    order of their first member."""

    groups: dict[str, tuple[int, ...]]

    @classmethod
    def of(cls, labels: Sequence[str]) -> Grouping:
        groups: dict[str, list[int]] = {}
        for i, label in enumerate(labels):
            groups.setdefault(str(label), []).append(i)
        return cls({g: tuple(m) for g, m in groups.items()})

    def describe(self, names: Sequence[str]) -> dict[str, list[str]]:
        return {g: [names[i] for i in members] for g, members in self.groups.items()}


def group_labels(hierarchy: str | Mapping[str, str], generators: Sequence[str],
                 families: Sequence[str | None]) -> list[str]:
    """Each specialist's group: its forgery family (`hierarchy: family`), or the user's mapping
    generator -> group (a generator it does not name is a group of its own)."""
    if isinstance(hierarchy, Mapping):
        return [str(hierarchy.get(g, g)) for g in generators]
    if hierarchy == "family":
        missing = [g for g, f in zip(generators, families) if not f]
        if missing:
            raise MergeError(f"specialist '{missing[0]}' records no forgery family; give merge.hierarchy as a "
                             "mapping generator -> group")
        return [str(f) for f in families]
    raise MergeError(f"unknown hierarchy {hierarchy!r} (none, family, or a mapping generator -> group)")


def specialist_groups(hierarchy: str | Mapping[str, str], paths: Sequence[Path | str]) -> dict[str, tuple[int, ...]]:
    """Group -> indices of `paths`, from each specialist file's sidecar (its generator and forgery family)."""
    from r2m.checkpoint import read_meta

    metas = [read_meta(p) for p in paths]
    generators = [m.get("generator") or Path(p).name for m, p in zip(metas, paths)]
    families = [(m.get("families") or [None])[0] if len(m.get("families") or []) == 1 else None for m in metas]
    return Grouping.of(group_labels(hierarchy, generators, families)).groups


def flat_means(pretrained, specialists: Sequence) -> dict[str, torch.Tensor]:
    """The mean over all specialists of what every merge averages (heads, BatchNorm statistics)."""
    tv = TaskVectors(pretrained, specialists)
    return {p.key: tv.mean_head(p.key) for p in tv.plan if p.kind in ("head", "statistic")}


def _level1_hparams(level1: Mapping, group: str) -> dict:
    """A group's level-1 hyperparameters: `level1[group]` when given per group, else `level1`."""
    per_group = level1.get(group) if isinstance(level1.get(group), Mapping) else None
    hp = dict(per_group) if per_group is not None else {k: v for k, v in level1.items() if not isinstance(v, Mapping)}
    return hp


def group_key(members: Sequence[str], hparams: Mapping) -> str:
    """A group model's identity: its members (by sha256, in order) and its level-1 hyperparameters."""
    import hashlib
    import json

    doc = json.dumps({"members": list(members), "hparams": dict(hparams)}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:20]


@contextmanager
def group_models(pretrained, specialists: Sequence, grouping: Grouping, level1: Mapping,
                 folder: Path | str | None = None, runtime: Runtime | None = None, *,
                 cache: Path | str | None = None, identities: Sequence[str] | None = None) -> Iterator[list]:
    """Level 1: one source per group (its specialist, or its merge streamed to a safetensors file),
    in group order. Without `cache` the files are temporary (in `folder`) and removed on exit;
    with `cache` (and each specialist's `identities`, e.g. its sha256) a group model is kept there
    and found again by its members and hyperparameters, so a new specialist re-merges only its
    own group."""
    runtime = runtime or Runtime()
    tmp = Path(tempfile.mkdtemp(prefix=".r2m-groups-", dir=folder))
    opened: list = []
    sources: list = []
    try:
        base = as_source(pretrained, "pretrained")
        for g, members in grouping.groups.items():
            inputs = [specialists[i] for i in members]
            if len(inputs) == 1:
                sources.append(as_source(inputs[0], f"group {g}"))
                continue
            hp = _level1_hparams(level1, g) if len(inputs) >= 3 else {}
            if cache is not None and identities is not None:
                path = Path(cache) / f"group-{group_key([identities[i] for i in members], hp)}.safetensors"
            else:
                path = tmp / f"{len(sources):03d}.safetensors"
            if not path.is_file():
                _write_group(base, inputs, hp, path, g, runtime, tmp)
            source = SafetensorsSource(path)
            opened.append(source)
            sources.append(source)
        yield sources
    finally:
        for s in opened:
            s.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _write_group(base, inputs: Sequence, hp: Mapping, path: Path, group: str, runtime: Runtime, tmp: Path) -> None:
    """One group model, streamed to `path` atomically: the pair's mean, or level-1 R²M."""
    from r2m.fileio import atomic_write, atomic_write_json

    tv = TaskVectors(base, inputs, runtime)

    def write(target: Path) -> None:
        sink = SafetensorsSink(target, tv.layout(), {"format": "pt", "group": group})
        try:
            if len(inputs) == 2:
                average(tv, sink=sink)
            else:
                scratch = DiskScratch(tmp)
                try:
                    r2m(base, inputs, runtime=Runtime(device=runtime.device, scratch=scratch, sink=sink), **hp)
                finally:
                    scratch.close()
            sink.close()
        except BaseException:
            sink.abort()
            raise

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write, fsync=False)
    # the sidecar last, as for every checkpoint (a file without one is an unfinished write)
    atomic_write_json(path.with_name(path.name + ".json"),
                      {"kind": "group", "group": group, "members": [getattr(i, "name", str(i)) for i in inputs],
                       "rule": "mean of two" if len(inputs) == 2 else "level-1 R²M", "hparams": dict(hp)}, fsync=False)


def _level2(pretrained, groups: Sequence, points: Sequence[dict], runtime: Runtime, averaged: dict,
            sinks=None) -> Iterator[tuple[dict, MergeResult]]:
    rt = Runtime(device=runtime.device, scratch=runtime.scratch, sink=runtime.sink, progress=runtime.progress,
                 prefetch=runtime.prefetch, averaged=averaged)
    tv = TaskVectors(pretrained, groups, rt)
    if len(groups) <= 2:  # K = 1: the group model; K = 2: their mean (a level of two, see above)
        for hp in points:
            result = average(tv, {"n_groups": len(groups), "level2": "group model" if len(groups) == 1 else LEVEL2_PAIR},
                             sinks(hp) if sinks else None)
            result.method, result.hparams = "r2m", dict(hp)
            yield hp, result
            del result  # before the next point is composed: one merged model in memory at a time
        return
    yield from r2m_points(tv, points, sinks=sinks)


def hierarchical_points(pretrained, specialists: Sequence, grouping: Grouping, *, points: Sequence[dict],
                        level1: Mapping | None = None, runtime: Runtime | None = None,
                        folder: Path | str | None = None, cache: Path | str | None = None,
                        identities: Sequence[str] | None = None) -> Iterator[tuple[dict, MergeResult]]:
    """Every level-2 grid point over the same level-1 group models (one analysis at level 2)."""
    runtime = runtime or Runtime()
    level1 = level1 or {}
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
    averaged = flat_means(pretrained, specialists)
    own = runtime.scratch is None
    scratch = DiskScratch(folder) if own else runtime.scratch
    try:
        with group_models(pretrained, specialists, grouping, level1, folder, runtime, cache=cache,
                          identities=identities) as groups:
            rt = Runtime(device=runtime.device, scratch=scratch, sink=runtime.sink, progress=runtime.progress,
                         prefetch=runtime.prefetch)
            for hp, result in _level2(pretrained, groups, points, rt, averaged):
                result.diagnostics["hierarchy"] = {"groups": {g: list(m) for g, m in grouping.groups.items()},
                                                   "level1": {g: _level1_hparams(level1, g) for g, m in grouping.groups.items()
                                                              if len(m) >= 3}}
                yield hp, result
                del result  # as above: the caller's copy is the only one while the next is composed
    finally:
        if own:
            scratch.close()


def hierarchical_r2m(pretrained, specialists: Sequence, grouping: Grouping, *, level1: Mapping | None = None,
                     runtime: Runtime | None = None, folder: Path | str | None = None, **level2) -> MergeResult:
    """One two-level merge (level-2 hyperparameters as keyword arguments, R²M's defaults)."""
    hp = {"alpha": 0.5, "rank": 0.7, "k": 1, "core": "centered", "eta_mode": "normalized", **level2}
    ((_, result),) = list(hierarchical_points(pretrained, specialists, grouping, points=[hp], level1=level1,
                                              runtime=runtime, folder=folder))
    return result


__all__ = ["Grouping", "flat_means", "group_labels", "group_models", "hierarchical_points", "hierarchical_r2m",
           "specialist_groups"]
