"""The MLflow model registry (docs/method.md, "Registry and release").

- one registered model per seen generator's specialist, `specialist-<generator>`; each version
  tagged with its data hash, θ0 hash and recipe;
- one registered model for the deployed detector, `r2m-detector`, with aliases `challenger`
  (the latest candidate), `champion` (what is served) and `previous-champion` (where
  `rollback` goes);
- lineage tags on detector versions: data hashes -> specialist versions -> merged checkpoint ->
  ONNX sha256 once exported.

Versions point at safetensors artifacts of a run (`runs:/<run>/checkpoint`), never at pickles,
nor at a path on one machine. History is immutable: a version is created with every tag of
its evaluation at once (verdict, lineage, hashes, artifact URI), in one call, and those tags
are never written again; a later evaluation (e.g. a changed gate) is a new version. Tags added
later (the export's, `published_version`) are each written once (`set_tags_once`). Only the
alias bookkeeping (`promoted_over`, `rolled_back`) follows the aliases.
Alias moves keep `champion` valid at every step: `champion` is written last, and if that
write fails `previous-champion` is put back as it was.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping

from r2m.errors import RegistryError
from r2m.names import specialist_name

DETECTOR = "r2m-detector"
CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous-champion"
CHECKPOINT_ARTIFACTS = "checkpoint"  # run artifact folder holding <file>.safetensors + sidecar
LOCK_MODEL = "r2m-loop-lock"  # not a model: the registry lock of `r2m.pipeline.lock` while it exists
BROKEN_LOCK = ".broken."  # `r2m-loop-lock.broken.<token>`: the record of a dead holder's lock broken


def is_lock_model(name: str) -> bool:
    """A registered model that is the registry lock (or the record of a broken one), not a model."""
    return name == LOCK_MODEL or name.startswith(LOCK_MODEL + BROKEN_LOCK)


def specialist_model_name(generator: str) -> str:
    return specialist_name(generator)


def _mlflow_exception():
    from mlflow.exceptions import MlflowException

    return MlflowException


def ensure_registered_model(client, name: str, description: str = "") -> None:
    """Create the registered model `name` unless it exists."""
    try:
        client.get_registered_model(name)
    except _mlflow_exception():
        client.create_registered_model(name, description=description or None)


def get_version(client, version: str | int, model: str = DETECTOR):
    """A model version, or `RegistryError` naming model and version."""
    try:
        return client.get_model_version(model, str(version))
    except _mlflow_exception():
        raise RegistryError(f"registered model '{model}' has no version {version}") from None


def alias_version(client, alias: str, model: str = DETECTOR) -> str | None:
    """The version an alias points at, or None."""
    try:
        return str(client.get_model_version_by_alias(model, alias).version)
    except _mlflow_exception():
        return None


def tag_value(value) -> str:
    """A tag's text: strings as they are, anything else as sorted JSON."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def set_tags_once(client, model: str, version: str | int, tags: Mapping[str, str]) -> dict[str, str]:
    """Write each tag the version does not have yet; an existing tag is never rewritten.
    Returns the tags written."""
    have = client.get_model_version(model, str(version)).tags
    written = {k: tag_value(v) for k, v in tags.items() if k not in have}
    for key, value in written.items():
        client.set_model_version_tag(model, str(version), key, value)
    return written


def register_specialist(client, run_id: str, meta: Mapping, *, artifact_path: str = CHECKPOINT_ARTIFACTS,
                        tags: Mapping[str, str] | None = None):
    """A new version of `specialist-<generator>` from a run's checkpoint artifacts, tagged with
    data_hash, theta0_sha256, recipe and the checkpoint's sha256 (plus `tags`), all at once."""
    generator = meta.get("generator")
    if not generator:
        raise RegistryError("specialist checkpoint meta has no 'generator'")
    name = specialist_model_name(generator)
    ensure_registered_model(client, name, f"Specialist fine-tuned from θ0 on generator '{generator}'.")
    tags = {
        "generator": generator,
        "data_hash": tag_value(meta.get("data_hash", "")),
        "theta0_sha256": meta.get("theta0_sha256", ""),
        "recipe": tag_value(meta.get("recipe", {})),
        "sha256": meta.get("sha256", ""),
        "kind": meta.get("kind", "specialist"),
        **{k: tag_value(v) for k, v in (tags or {}).items()},
    }
    return client.create_model_version(
        name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id, tags=tags,
        description=f"specialist for {generator}",
    )


def lineage_tags(specialists: Mapping[str, Mapping]) -> dict[str, str]:
    """Tags linking a merged version to its inputs. `specialists`: generator ->
    {"version": v, "data_hash": h} (the specialist model versions merged)."""
    tags = {"lineage.specialists": tag_value({g: str(s.get("version", "")) for g, s in specialists.items()})}
    for gen, s in specialists.items():
        tags[f"lineage.{gen}"] = f"{specialist_model_name(gen)} v{s.get('version', '?')} " \
                                 f"(data {str(s.get('data_hash', '?'))[:12]})"
    tags["lineage.data_hashes"] = tag_value({g: s.get("data_hash", "") for g, s in specialists.items()})
    return tags


def register_candidate(
    client,
    run_id: str,
    *,
    gate_passed: bool,
    gate_reason: str,
    meta: Mapping | None = None,
    specialists: Mapping[str, Mapping] | None = None,
    artifact_path: str = CHECKPOINT_ARTIFACTS,
    challenger: bool = True,
    tags: Mapping[str, str] | None = None,
):
    """A new `r2m-detector` version for a merged candidate, created with the gate verdict, the
    lineage and `tags` in one call; `challenger` points at it. It never touches `champion`."""
    ensure_registered_model(client, DETECTOR, "The deployed deepfake detector (merged specialists).")
    meta = dict(meta or {})
    tags = {
        "gate": "passed" if gate_passed else "failed",
        "gate_reason": gate_reason[:4000],
        "sha256": meta.get("sha256", ""),
        "theta0_sha256": meta.get("theta0_sha256", ""),
        "method": tag_value(meta.get("method", "")),
        **lineage_tags(specialists or {}),
        **{k: tag_value(v) for k, v in (tags or {}).items()},
    }
    mv = client.create_model_version(
        DETECTOR, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id, tags=tags,
        description=gate_reason[:4000],
    )
    if challenger:
        client.set_registered_model_alias(DETECTOR, CHALLENGER, mv.version)
    return mv


def tag_export(client, version: str | int, onnx_sha256: str, **more: str) -> None:
    """Close the lineage: the ONNX file exported from this version (and e.g. its artifact URI).
    Written once: a version's export tags are never replaced."""
    get_version(client, version)
    set_tags_once(client, DETECTOR, version, {"onnx_sha256": onnx_sha256, **more})


@dataclass(frozen=True)
class AliasMove:
    """What an alias move did."""

    champion: str
    previous_champion: str | None
    replaced: str | None  # the champion before the move
    changed: bool


def _set_or_delete(client, alias: str, version: str | None) -> None:
    if version is None:
        try:
            client.delete_registered_model_alias(DETECTOR, alias)
        except _mlflow_exception():
            pass
    else:
        client.set_registered_model_alias(DETECTOR, alias, version)


def refuse_failed(mv, force: bool = False) -> None:
    """`RegistryError` for a version whose gate failed (unless `force`)."""
    if mv.tags.get("gate") == "failed" and not force:
        raise RegistryError(
            f"{DETECTOR} v{mv.version} failed the gate ({mv.tags.get('gate_reason', 'no reason recorded')}); "
            "refusing to promote it"
        )


def promote(client, version: str | int, *, force: bool = False) -> AliasMove:
    """`champion` -> `version`, the old champion -> `previous-champion`.

    A version whose gate failed is refused unless `force`. `champion` is set last; if that
    fails, `previous-champion` is restored, so champion always names a valid version.
    """
    version = str(version)
    mv = get_version(client, version)
    refuse_failed(mv, force)
    old = alias_version(client, CHAMPION)
    old_previous = alias_version(client, PREVIOUS)
    if old == version:
        # already champion; finish what a kill after the champion write may have left undone
        if "promoted_over" not in mv.tags:
            client.set_model_version_tag(DETECTOR, version, "promoted_over", old_previous or "")
        if alias_version(client, CHALLENGER) == version:
            _set_or_delete(client, CHALLENGER, None)
        return AliasMove(version, old_previous, old, changed=False)
    if old is not None:
        client.set_registered_model_alias(DETECTOR, PREVIOUS, old)
    try:
        client.set_registered_model_alias(DETECTOR, CHAMPION, version)
    except Exception as err:
        _set_or_delete(client, PREVIOUS, old_previous)  # champion never moved
        raise RegistryError(f"could not move '{CHAMPION}' to {DETECTOR} v{version}: {err}") from err
    client.set_model_version_tag(DETECTOR, version, "promoted_over", old or "")
    if "rolled_back" in mv.tags:
        client.delete_model_version_tag(DETECTOR, version, "rolled_back")
    if alias_version(client, CHALLENGER) == version:
        _set_or_delete(client, CHALLENGER, None)
    return AliasMove(version, old, old, changed=True)


def rollback(client) -> AliasMove:
    """`champion` -> `previous-champion`; `previous-champion` -> the champion that one replaced
    (from its `promoted_over` tag), so repeated rollbacks walk back the history."""
    current = alias_version(client, CHAMPION)
    previous = alias_version(client, PREVIOUS)
    if previous is None:
        raise RegistryError(f"{DETECTOR} has no '{PREVIOUS}' alias: nothing to roll back to")
    earlier = get_version(client, previous).tags.get("promoted_over") or None
    client.set_registered_model_alias(DETECTOR, CHAMPION, previous)
    _set_or_delete(client, PREVIOUS, earlier if earlier not in (previous, current) else None)
    if current is not None:
        client.set_model_version_tag(DETECTOR, current, "rolled_back", "true")
    return AliasMove(previous, alias_version(client, PREVIOUS), current, changed=True)


def describe_models(client) -> list[dict]:
    """Every version of the detector and the specialists: name, version, aliases, key tags."""
    rows = []
    for rm in client.search_registered_models():
        if is_lock_model(rm.name):
            continue
        by_version: dict[str, list[str]] = {}
        for alias, v in (rm.aliases or {}).items():
            by_version.setdefault(str(v), []).append(alias)
        for mv in client.search_model_versions(f"name='{rm.name}'"):
            rows.append({
                "model": rm.name,
                "version": str(mv.version),
                "aliases": sorted(by_version.get(str(mv.version), [])),
                "gate": mv.tags.get("gate", ""),
                # a detector version's gate verdict, a specialist's own checks (accepted / rejected)
                "verdict": mv.tags.get("gate") or mv.tags.get("status", ""),
                "sha256": mv.tags.get("sha256", "")[:12],
                "onnx_sha256": mv.tags.get("onnx_sha256", "")[:12],
                "source": mv.source,
            })
    return sorted(rows, key=lambda r: (r["model"] != DETECTOR, r["model"], -int(r["version"])))
