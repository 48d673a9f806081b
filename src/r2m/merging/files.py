"""Merging checkpoint files (the I/O side of `r2m merge` and the pipeline's re-merge step).

Checks the checkpoint contract across files (every specialist's sidecar names the θ0 it was
fine-tuned from, by the sha256 of θ0's safetensors file; for a file without that record the
user may vouch with `assume_theta0`, recorded in the output as a waived check), streams the
merge tensor by tensor into a temporary file beside the output, and publishes it atomically
with a sidecar `<out>.json` of kind "merged": method, hyperparameters, θ0 hash, inputs (sha256,
generator) and the method's diagnostics.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping, Sequence

import torch

from r2m.checkpoint import check_head, checkpoint_keys, file_sha256, missing_file_reason, read_meta, record_path, recorded_theta0, sidecar_path, write_json
from r2m.errors import CheckpointError, MergeError, check_output_file
from r2m.fileio import atomic_write
from r2m.merging.hierarchy import Grouping
from r2m.merging.registry import get_method
from r2m.merging.stream import DiskScratch, SafetensorsSink, SafetensorsSource
from r2m.merging.taskvectors import MergeResult, Runtime, TaskVectors


def check_theta0(pretrained: Path, specialists: Sequence[Path], *, assume_theta0: bool = False) -> tuple[str, list[Path]]:
    """(θ0's sha256, the specialists whose θ0 was assumed, not checked). Raises MergeError naming
    the first specialist fine-tuned from another θ0, or without a θ0 hash unless `assume_theta0`:
    the user's word for files r2m did not write. A recorded hash is always checked; a missing file,
    or a record that is not a string, is a CheckpointError naming the file or its sidecar."""
    theta0_sha = file_sha256(pretrained)
    assumed = []
    for path in specialists:
        if not Path(path).is_file():  # existence before provenance: never "no θ0 record" for a missing file
            raise CheckpointError(path, missing_file_reason(path))
        meta = read_meta(path)
        claimed = recorded_theta0(path)  # a record that is not a string is an error, never waived
        if not claimed:
            if assume_theta0:
                assumed.append(path)
                continue
            record = f"sidecar {sidecar_path(path).name} has no 'theta0_sha256'" if meta else \
                f"no r2m sidecar ({sidecar_path(path).name}) with 'theta0_sha256'"
            raise MergeError(f"{path}: {record}; cannot check it was fine-tuned from {pretrained} "
                             "(if it was, pass --assume-theta0, or record it with `r2m import-checkpoint --pretrained`)")
        if claimed != theta0_sha:
            raise MergeError(f"{path}: fine-tuned from another θ0 (theta0_sha256 {claimed[:12]}…, {pretrained} is {theta0_sha[:12]}…)")
    return theta0_sha, assumed


def merge_files(
    method: str,
    pretrained: Path | str,
    specialists: Sequence[Path | str],
    out: Path | str,
    hparams: dict | None = None,
    *,
    device: str | None = None,
    progress: bool = False,
    check_hashes: bool = True,
    assume_theta0: bool = False,
    groups: Mapping[str, Sequence[int]] | None = None,
    level1: Mapping | None = None,
    group_cache: Path | None = None,
) -> tuple[MergeResult, dict]:
    """Merge specialist files into `out` (+ sidecar). Returns (result without tensors, sidecar meta).

    `assume_theta0` accepts specialists without a recorded θ0 hash as fine-tuned from
    `pretrained`; the sidecar lists them under `theta0_check`. `groups` (group -> indices into
    `specialists`) makes it the two-level merge of `r2m.merging.hierarchy` with `hparams` at
    level 2 and `level1` (per group, or for all) inside groups of three or more; group models
    are kept in `group_cache` when given."""
    spec = get_method(method)
    hp = spec.resolve(hparams or {})
    pretrained = Path(pretrained)
    specialists = [Path(s) for s in specialists]
    out = check_output_file(out, MergeError)
    if not specialists:
        raise MergeError("no specialists to merge: give at least one --specialist")
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        raise MergeError(f"--device {device}: CUDA is not available on this machine")
    for path in (pretrained, *specialists):
        if path.resolve() == out.resolve():
            raise MergeError(f"{out}: the output would overwrite an input")
    for path in (pretrained, *specialists):  # half a head would be averaged with the others' whole heads
        check_head(checkpoint_keys(path), path)
    sources = [SafetensorsSource(p) for p in (pretrained, *specialists)]
    theta0_sha, assumed = check_theta0(pretrained, specialists, assume_theta0=assume_theta0) if check_hashes else (None, [])
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = DiskScratch(out.parent) if spec.scratch else None
    start = time.perf_counter()
    outcome: dict = {}

    hierarchy = None
    if groups is not None:
        hierarchy = {"grouping": Grouping({g: tuple(m) for g, m in groups.items()}), "level1": dict(level1 or {}),
                     "folder": out.parent, "cache": group_cache,
                     "identities": [file_sha256(p) for p in specialists] if group_cache is not None else None}

    def write(tmp: Path) -> None:
        layout = TaskVectors(sources[0], sources[1:]).layout()
        sink = SafetensorsSink(tmp, layout, {"format": "pt", "method": method})
        try:
            runtime = Runtime(device=device, scratch=scratch, sink=sink, progress=progress)
            if hierarchy is None:
                outcome["result"] = spec.fn(sources[0], sources[1:], runtime=runtime, **hp)
            else:
                ((_, outcome["result"]),) = list(spec.run_points(sources[0], sources[1:], [hp], runtime, hierarchy))
            outcome["runtime"] = runtime
            sink.close()
        except BaseException:
            sink.abort()
            raise

    try:
        atomic_write(out, write)
    finally:
        if scratch is not None:
            scratch.close()
        for s in sources:
            s.close()
    seconds = time.perf_counter() - start
    result, runtime = outcome["result"], outcome["runtime"]
    theta0_meta = read_meta(pretrained)
    inputs = []
    for path in specialists:
        meta = read_meta(path)
        inputs.append({"path": record_path(path), "sha256": file_sha256(path) if check_hashes else None, "generator": meta.get("generator"),
                       "theta0_assumed": path in assumed})
    hparams_out = dict(result.hparams)
    if hierarchy is not None:  # which specialists in which group, and each group's level-1 point
        names = [i["generator"] or Path(i["path"]).name for i in inputs]
        hparams_out["hierarchy"] = {"groups": hierarchy["grouping"].describe(names),
                                    "level1": result.diagnostics.get("hierarchy", {}).get("level1", {})}
    sidecar = {
        "kind": "merged",
        "method": method,
        "hparams": hparams_out,
        "model": theta0_meta.get("model") or read_meta(specialists[0]).get("model"),
        "theta0_sha256": theta0_sha,
        "theta0_check": {"waived_by": "--assume-theta0", "specialists": [record_path(p) for p in assumed]} if assumed
        else ("sha256" if check_hashes else "skipped"),
        "pretrained": record_path(pretrained),  # relative to the project root inside it (r2m.checkpoint.record_path)
        "specialists": inputs,
        "generators": [i["generator"] for i in inputs],
        "diagnostics": result.diagnostics,
        "merge_seconds": seconds,
        "device": str(runtime.resolved_device()),
        "sha256": file_sha256(out),
    }
    write_json(sidecar_path(out), sidecar)
    return result, sidecar


def load_merged(path: Path | str) -> dict[str, torch.Tensor]:
    """Read a merged file back (tests, small models)."""
    src = SafetensorsSource(path)
    try:
        return {k: src.get(k).clone() for k in src.keys()}
    finally:
        src.close()
