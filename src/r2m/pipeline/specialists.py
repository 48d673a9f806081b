"""Steps 2-3 of the loop: fine-tune one specialist per new generator, check it, register it.

A specialist is identified by (generator, data hash, θ0 hash, recipe hash), recorded as tags
on its version of the registered model `specialist-<generator>`. Onboarding is idempotent: a
version with the same identity is reused; a checkpoint already trained (crash before
registration) is registered without training again. A version is created with every tag at
once (identity, verdict, `artifact_uri`), so it is complete or absent, and never rewritten;
its checkpoint is found through the artifact URI (`r2m.tracking.artifacts`), not a local path.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from r2m.checkpoint import file_sha256, read_meta
from r2m.config import Params
from r2m.data import GeneratorDataset
from r2m.errors import RegistryError
from r2m.pipeline.safety import SpecialistCheck, check_specialist
from r2m.tracking import mlflow_store, registry, runs
from r2m.tracking.artifacts import ARTIFACT_URI_TAG, checkpoint_uri, resolve_checkpoint
from r2m.training.specialist import recipe, train_specialist

ACCEPTED, REJECTED = "accepted", "rejected"


@dataclass(frozen=True)
class Specialist:
    generator: str
    version: str
    path: Path
    data_hash: str
    val_auc: float
    status: str
    reason: str
    registered_at: int = 0  # the registry version's creation time (ms): the onboarding order


def identity(dataset: GeneratorDataset, params: Params, theta0_sha256: str) -> dict:
    """What makes two specialists the same: data content, θ0 and recipe (tags set at registration)."""
    return {"data_hash": dataset.data_hash, "theta0_sha256": theta0_sha256, "recipe": recipe(params)}


def _identity_of(mv) -> dict:
    tags = mv.tags
    try:
        recipe_tag = json.loads(tags.get("recipe", "null"))
    except json.JSONDecodeError:
        recipe_tag = None
    return {"data_hash": tags.get("data_hash"), "theta0_sha256": tags.get("theta0_sha256"), "recipe": recipe_tag}


def checkpoint_path(dataset: GeneratorDataset, params: Params) -> Path:
    return params.path("artifacts") / "specialists" / f"{dataset.name}-{dataset.data_hash[:12]}.safetensors"


def _from_version(mv, params: Params, client) -> Specialist:
    tags = mv.tags
    return Specialist(
        generator=tags.get("generator", ""),
        version=str(mv.version),
        path=resolve_checkpoint(params, client, mv),
        data_hash=tags.get("data_hash", ""),
        val_auc=float(tags.get("val_auc", "nan")),
        status=tags.get("status", ""),
        reason=tags.get("status_reason", ""),
        registered_at=int(mv.creation_timestamp or 0),
    )


def _versions(client, generator: str) -> list:
    name = registry.specialist_model_name(generator)
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except Exception:  # the registered model does not exist yet
        return []
    return sorted(versions, key=lambda mv: int(mv.version))


def find_version(client, generator: str, ident: dict):
    """The registered version with this identity, if any."""
    return next((mv for mv in _versions(client, generator) if _identity_of(mv) == ident), None)


def is_onboarded(client, dataset: GeneratorDataset, params: Params, theta0_sha256: str) -> bool:
    """True once this content has a specialist version with a decided status."""
    mv = find_version(client, dataset.name, identity(dataset, params, theta0_sha256))
    return mv is not None and mv.tags.get("status") in (ACCEPTED, REJECTED)


def registered_specialists(params: Params, generators: Sequence[str], client=None) -> list[Specialist]:
    """The newest accepted specialist of each generator in `generators` (registry order)."""
    client = client or mlflow_store.client(params)
    found = []
    for generator in generators:
        accepted = [mv for mv in _versions(client, generator) if mv.tags.get("status") == ACCEPTED]
        if accepted:
            found.append(_from_version(accepted[-1], params, client))
    return found


def onboard_specialist(
    dataset: GeneratorDataset,
    params: Params,
    *,
    pretrained: Path,
    accepted: Sequence[Specialist] = (),
    datasets: Sequence[GeneratorDataset] = (),
    progress: bool = True,
    client=None,
    trained: tuple[str, Path] | None = None,
) -> tuple[Specialist, SpecialistCheck | None]:
    """Train (unless already trained), check and register the specialist of `dataset`.

    `accepted` are the specialists accepted so far and `datasets` the validated seen datasets:
    the accepted ones' real images are the trusted reference of the outlier check (the very first
    specialist has none). `trained`: (MLflow run id, its checkpoint fetched here) of a training
    done elsewhere (a work-pool worker, `r2m.pipeline.pool`): nothing is trained here, and the
    version is registered from that run, whose artifact holds the checkpoint.
    """
    client = client or mlflow_store.client(params)
    by_name = {d.name: d for d in datasets}
    theta0 = file_sha256(pretrained)
    ident = identity(dataset, params, theta0)
    mv = find_version(client, dataset.name, ident)
    if mv is not None and mv.tags.get("status") in (ACCEPTED, REJECTED):
        return _from_version(mv, params, client), None

    run_id, path = trained if trained is not None else (None, checkpoint_path(dataset, params))
    meta = read_meta(path) if path.is_file() else {}
    if not (meta.get("sha256") == (file_sha256(path) if path.is_file() else None)
            and meta.get("data_hash") == dataset.data_hash and meta.get("theta0_sha256") == theta0
            and meta.get("recipe") == recipe(params)):
        if trained is not None:
            raise RegistryError(f"training run {run_id}: its checkpoint {path.name} is not the specialist of "
                                f"{dataset.name} with this data, θ0 and recipe")
        train_specialist([dataset], params, path, pretrained=pretrained, name=dataset.name, progress=progress)
        meta = read_meta(path)

    trusted = [(by_name[s.generator], s.path) for s in accepted if s.generator != dataset.name and s.generator in by_name]
    check = check_specialist(dataset, path, float(meta["metrics"]["val_auc"]), trusted,
                             pretrained=pretrained, params=params)
    name = registry.specialist_model_name(dataset.name)
    if mv is None:
        return register_checked(client, params, path, dataset, check, meta, run_id=run_id), check
    # a version left without its verdict by an older release: add what it lacks, rewrite nothing
    registry.set_tags_once(client, name, mv.version, _verdict(dataset, check))
    return _from_version(client.get_model_version(name, str(mv.version)), params, client), check


def _verdict(dataset: GeneratorDataset, check: SpecialistCheck) -> dict:
    return {
        "val_auc": f"{check.val_auc:.6f}",
        "family": dataset.family,
        "domain": dataset.domain,
        "status_reason": check.reason,
        "status": ACCEPTED if check.accepted else REJECTED,
    }


def register_checked(client, params: Params, path: Path, dataset: GeneratorDataset, check: SpecialistCheck,
                     meta: dict, extra_tags: dict | None = None, run_id: str | None = None) -> Specialist:
    """Log the checked specialist's run and register it as a new version of `specialist-<generator>`
    with every tag at once (identity, verdict, artifact URI, `extra_tags`). `run_id`: the run of a
    training done elsewhere, which already holds the checkpoint: the check's metrics go to it."""
    verdict = _verdict(dataset, check)
    check_metrics = {"check/real_disagreement": check.real_disagreement,
                     "check/task_vector_cosine": check.task_vector_cosine}
    if run_id is None:
        run_id = runs.log_specialist_run(params, path, dataset=dataset, mlflow_client=client,
                                         extra_metrics=check_metrics)
    else:
        for key, value in check_metrics.items():
            if value is not None and math.isfinite(value):  # none yet for the first specialist
                client.log_metric(run_id, key, float(value))
    client.set_tag(run_id, "status", verdict["status"])
    for key, value in (extra_tags or {}).items():
        client.set_tag(run_id, key, value)
    mv = registry.register_specialist(client, run_id, meta, tags={
        ARTIFACT_URI_TAG: checkpoint_uri(run_id, path.name), **(extra_tags or {}), **verdict})
    name = registry.specialist_model_name(dataset.name)
    return _from_version(client.get_model_version(name, str(mv.version)), params, client)
