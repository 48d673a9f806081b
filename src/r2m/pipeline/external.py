"""Specialists trained elsewhere, handed to the continual loop (`r2m register-specialist`).

An external specialist for a seen generator dataset goes through the checks one r2m trained
gets before the next `r2m run` merges it:
- θ0 identity: its sidecar records the sha256 of the loop's θ0 (`r2m import-checkpoint
  --pretrained`), or, for a file without that record, the user vouches with `assume_theta0`
  (recorded as such); it must hold the loop detector's keys and shapes, head included;
- its own validation AUC on that generator's dataset, computed here (not taken from the file),
  must reach `flow.min_specialist_val_auc`;
- the label-flip guard against the real images of the generators already accepted
  (`r2m.pipeline.safety`).
Every check runs on the user's file where it lies; a check that fails (a missing or unreadable
file, half a head, another θ0, scores that are NaN) is an error and leaves nothing in
`artifacts/` or the registry. Then the file is copied, atomically with its sidecar, into
`artifacts/specialists/external/` (the registry points at the copy), logged as a run and registered as a version of `specialist-<generator>` with its verdict and
`origin=external`. Accepted, it is the newest specialist of its generator: the loop does not
train one for that data and merges it at its next step. Rejected, it stays in the registry as
a rejected version and the loop treats the dataset as it would without it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from r2m.checkpoint import (check_head, file_sha256, load_checkpoint, missing_file_reason, read_meta, recorded_theta0,
                            save_checkpoint)
from r2m.config import Params
from r2m.data import FAKE, GeneratorDataset, validate_data_root
from r2m.errors import CheckpointError, DatasetError
from r2m.evaluation.metrics import auc
from r2m.models import ensure_pretrained
from r2m.models.detector import build_detector
from r2m.pipeline.safety import SpecialistCheck, check_specialist, fake_scores, finite_scores
from r2m.pipeline.specialists import ACCEPTED, REJECTED, Specialist, _from_version, _versions, register_checked, registered_specialists
from r2m.tracking import mlflow_store

EXTERNAL = "external"  # the `origin` tag of a version registered from outside


def has_external(client, dataset: GeneratorDataset, theta0_sha256: str) -> bool:
    """Whether an accepted external specialist covers this dataset's content (the scan then
    trains no specialist of its own for it)."""
    return any(mv.tags.get("origin") == EXTERNAL and mv.tags.get("status") == ACCEPTED
               and mv.tags.get("data_hash") == dataset.data_hash and mv.tags.get("theta0_sha256") == theta0_sha256
               for mv in _versions(client, dataset.name))


def seen_datasets(params: Params) -> list[GeneratorDataset]:
    """The valid seen datasets under the data root (read-only: nothing is quarantined here)."""
    root = params.path("data_root")
    if not root.is_dir():
        return []
    return [d for _, d in validate_data_root(root, params.data) if isinstance(d, GeneratorDataset) and d.role == "seen"]


def check_theta0(path: Path, theta0: Path, *, assume_theta0: bool) -> str:
    """'sha256' (recorded and equal to the loop's θ0) or 'assumed'; else CheckpointError. The
    file's existence is checked first, so a missing file is never reported as "no θ0 record"."""
    if not Path(path).is_file():
        raise CheckpointError(path, missing_file_reason(path))
    claimed = recorded_theta0(path)
    if claimed:
        if claimed != file_sha256(theta0):
            raise CheckpointError(path, f"fine-tuned from another θ0 (theta0_sha256 {claimed[:12]}…; the loop's θ0 "
                                        f"{theta0} is {file_sha256(theta0)[:12]}…)")
        return "sha256"
    if not assume_theta0:
        raise CheckpointError(path, f"no record of its θ0 (theta0_sha256): import it with `r2m import-checkpoint "
                                    f"--pretrained {theta0}`, or pass --assume-theta0 if it was fine-tuned from that θ0")
    return "assumed"


def validation_auc(path: Path, dataset: GeneratorDataset, params: Params) -> float:
    """The specialist's AUC on its dataset's validation split, scored here with the loop's model."""
    samples = dataset.split("val")
    labels = np.array([s.label == FAKE for s in samples], dtype=np.int64)
    if len(set(labels.tolist())) < 2:
        return float("nan")
    scores = fake_scores(path, samples, params, model_cfg=params.model)
    return auc(labels, finite_scores(path, scores, f"'{dataset.name}' validation images"), dataset.name)


def register_external_specialist(
    path: Path | str,
    generator: str,
    params: Params,
    *,
    assume_theta0: bool = False,
    client=None,
    progress: bool = False,
) -> tuple[Specialist, SpecialistCheck | None]:
    """Check `path` as the specialist of seen dataset `generator` and register it with its
    verdict. Registering the same file for the same data again returns the version it got.

    Every check runs on the user's file where it lies (existence, contract, θ0, the dataset, its
    scores); only then is it copied, atomically with its sidecar, into
    `artifacts/specialists/external/` and registered. A check that fails leaves nothing behind."""
    path = Path(path)
    ckpt = load_checkpoint(path)  # exists and is readable safetensors, before any record in it is read
    check_head(ckpt.tensors, path, required=True)
    client = client or mlflow_store.client(params)
    pretrained = ensure_pretrained(params, progress=progress)
    build_detector(params.model).load_checkpoint_tensors(ckpt.tensors, source=path)  # the loop's keys and shapes
    theta0_check = check_theta0(path, pretrained, assume_theta0=assume_theta0)
    datasets = seen_datasets(params)
    dataset = next((d for d in datasets if d.name == generator), None)
    if dataset is None:
        raise DatasetError(params.path("data_root") / generator, f"no valid seen dataset '{generator}' under the data root")

    sha = file_sha256(path)
    for mv in _versions(client, generator):
        if mv.tags.get("sha256") == sha and mv.tags.get("data_hash") == dataset.data_hash \
                and mv.tags.get("status") in (ACCEPTED, REJECTED):
            return _from_version(mv, params, client), None
    val_auc = validation_auc(path, dataset, params)
    accepted = registered_specialists(params, [d.name for d in datasets], client)
    by_name = {d.name: d for d in datasets}
    trusted = [(by_name[s.generator], s.path) for s in accepted if s.generator != generator]
    check = check_specialist(dataset, path, val_auc, trusted, pretrained=pretrained, params=params, model_cfg=params.model)

    copy = params.path("artifacts") / "specialists" / EXTERNAL / f"{generator}-{sha[:12]}.safetensors"
    meta = {
        "kind": "specialist", "origin": EXTERNAL, "generator": generator, "generators": [generator],
        "families": [dataset.family], "domains": [dataset.domain], "data_hash": dataset.data_hash,
        "theta0_sha256": file_sha256(pretrained), "theta0_check": theta0_check,
        "model": read_meta(pretrained).get("model"), "source": path.name,
        "source_meta": {k: v for k, v in ckpt.meta.items() if k != "sha256"},
        "metrics": {"val_auc": val_auc},
    }
    save_checkpoint(copy, ckpt.tensors, meta)  # atomic (r2m.fileio); the same tensors: the copy's sha256 is the file's
    extra = {"origin": EXTERNAL, "theta0_check": theta0_check, "source": path.name}  # provenance, not a path to read
    return register_checked(client, params, copy, dataset, check, read_meta(copy), extra), check
