"""The last steps of the loop, for a candidate that passed the gate: export ONNX with parity,
close the lineage, move `champion`, publish to the model repository.

Every step can be redone after a crash: the ONNX export is reused when its report matches the
candidate's checkpoint, `promote` is a no-op when `champion` already names the version, and a
version already published (found by the checkpoint sha256 in the ONNX metadata) is not
published twice. The server keeps serving the previous version until the new one's folder
appears whole (publishing renames a finished folder into place) and config.pbtxt names it.

What is served follows `champion`: `release` points the repository's config at the released
version, `promote` / `rollback` here move the alias *and* the served version (refusing, with
nothing changed, a version that has no published copy while the repository serves one), and
`serve_champion` (run at the end of every loop run) repairs a kill between the two. The ONNX
file is logged with the candidate's merge run (`onnx/`) and referenced by its artifact URI
(`onnx_uri`), so a machine whose repository lacks a version's copy (a second machine on a
shared tracking server, or a folder deleted by hand) fetches it from the registry, checks it
against `onnx_sha256` and publishes it there (`ensure_published`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from r2m.config import Params
from r2m.data import GeneratorDataset
from r2m.export.metadata import read_metadata
from r2m.export.onnx_export import ExportResult, export_checkpoint, report_path
from r2m.export.publish import MODEL_FILE, MODEL_NAME, list_versions, model_dir, point_serving, publish, served_version
from r2m.errors import RegistryError
from r2m.tracking import registry
from r2m.tracking.artifacts import resolve_file

PUBLISHED_TAG = "published_version"
ONNX_ARTIFACTS = "onnx"


@dataclass(frozen=True)
class Release:
    version: str  # the detector's registry version, now `champion`
    onnx_path: Path
    onnx_sha256: str
    published: Path
    previous_champion: str | None
    int8_kept: bool | None


def onnx_path_for(params: Params, version: str) -> Path:
    return params.path("artifacts") / "onnx" / f"r2m-detector-v{version}.onnx"


def _reusable_export(path: Path, checkpoint_sha256: str) -> dict | None:
    report = report_path(path)
    if not (path.is_file() and report.is_file()):
        return None
    data = json.loads(report.read_text())
    return data if data.get("lineage", {}).get("checkpoint_sha256") == checkpoint_sha256 else None


def export_candidate(params: Params, checkpoint: Path, checkpoint_sha256: str, version: str,
                     seen: Sequence[GeneratorDataset], lineage: dict) -> dict:
    """ONNX export + parity (+ int8 challenger); reused when already done for this checkpoint."""
    out = onnx_path_for(params, version)
    done = _reusable_export(out, checkpoint_sha256)
    if done is None:
        result: ExportResult = export_checkpoint(checkpoint, out, params, datasets=list(seen),
                                                 model_version=version, lineage_extra=lineage)
        done = result.as_dict(params.root)
    return done


def published_copy(repository: Path, checkpoint_sha256: str) -> Path | None:
    """The published model.onnx exported from this checkpoint, if any."""
    for v in reversed(list_versions(repository)):
        path = model_dir(repository) / str(v) / "model.onnx"
        if read_metadata(path).get("lineage", {}).get("checkpoint_sha256") == checkpoint_sha256:
            return path
    return None


def log_onnx(client, run_id: str, onnx_path: Path) -> str:
    """The exported ONNX file as an artifact of the candidate's merge run (once); its URI."""
    if not any(a.path == f"{ONNX_ARTIFACTS}/{onnx_path.name}" for a in client.list_artifacts(run_id, ONNX_ARTIFACTS)):
        client.log_artifact(run_id, str(onnx_path), ONNX_ARTIFACTS)
    return f"runs:/{run_id}/{ONNX_ARTIFACTS}/{onnx_path.name}"


def served_copy(params: Params, client, version: str) -> Path | None:
    """The published model.onnx of detector `version`: the folder its `published_version` tag
    names when that folder still holds its checkpoint's export, else any folder that does."""
    mv = registry.get_version(client, version)
    sha = mv.tags.get("sha256")
    repository = params.path("model_repository")
    tagged = mv.tags.get(PUBLISHED_TAG)
    if tagged and sha:
        path = repository / tagged / MODEL_FILE
        if path.is_file() and read_metadata(path).get("lineage", {}).get("checkpoint_sha256") == sha:
            return path
    return published_copy(repository, sha) if sha else None


def ensure_published(params: Params, client, version: str, *, serve: bool = True) -> Path | None:
    """Detector `version`'s published model.onnx in this machine's repository: the copy there,
    else its registered ONNX (`onnx_uri`) fetched and published (`serve=False`: without changing
    what is served). None when the version was never exported."""
    found = served_copy(params, client, version)
    if found is not None:
        return found
    mv = registry.get_version(client, version)
    uri = mv.tags.get("onnx_uri")
    if not uri:
        return None
    onnx = resolve_file(params, client, uri, mv.tags.get("onnx_sha256") or None)
    return publish(onnx, params.path("model_repository"), params.export, serve=serve).path


def serve(params: Params, published: Path) -> int:
    """Point the repository's config at the published `<repo>/<model>/<n>/model.onnx`; n."""
    version = int(published.parent.name)
    repository = params.path("model_repository")
    if served_version(repository) != version:
        point_serving(repository, version)
    return version


def serve_champion(params: Params, client) -> Path | None:
    """Make the repository serve `champion`'s published copy (no-op when it already does),
    publishing it from the registry first where this repository lacks it; None when there is
    no champion or it was never exported."""
    champion = registry.alias_version(client, registry.CHAMPION)
    if champion is None:
        return None
    published = ensure_published(params, client, champion)
    if published is not None:
        serve(params, published)
    return published


def _require_servable(params: Params, client, version: str) -> None:
    repository = params.path("model_repository")
    if ensure_published(params, client, version, serve=False) is None and list_versions(repository):
        raise RegistryError(
            f"{registry.DETECTOR} v{version} has no published copy in {model_dir(repository)} and no registered "
            "ONNX file (onnx_uri), so the server could not serve it; nothing changed "
            "(release it with `r2m run`, or `r2m export` + `r2m publish` it)")


def promote(params: Params, client, version: str, *, force: bool = False) -> tuple[registry.AliasMove, Path | None]:
    """`champion` -> `version` and the server with it; returns the move and the served file."""
    registry.refuse_failed(registry.get_version(client, version), force)
    _require_servable(params, client, str(version))
    move = registry.promote(client, version, force=force)
    return move, serve_champion(params, client)


def rollback(params: Params, client) -> tuple[registry.AliasMove, Path | None]:
    """`champion` -> `previous-champion` and the server with it; returns the move and the served file."""
    target = registry.alias_version(client, registry.PREVIOUS)
    if target is not None:
        _require_servable(params, client, target)
    move = registry.rollback(client)
    return move, serve_champion(params, client)


def release(params: Params, client, version: str, checkpoint: Path, checkpoint_sha256: str,
            seen: Sequence[GeneratorDataset], lineage: dict | None = None) -> Release:
    """Export, promote, publish and serve detector `version` (its gate passed)."""
    export = export_candidate(params, checkpoint, checkpoint_sha256, version, seen, lineage or {})
    onnx_path = params.root / export["onnx_path"]  # the report names it relative to the project root
    run_id = registry.get_version(client, version).run_id
    registry.tag_export(client, version, export["sha256"], onnx_uri=log_onnx(client, run_id, onnx_path),
                        int8_kept=str(export.get("int8_kept")))
    move = registry.promote(client, version)
    repository = params.path("model_repository")
    published = published_copy(repository, checkpoint_sha256)
    if published is None:
        # fp32 is what the gate and the parity check measured; a kept int8 file stays beside it
        published = publish(onnx_path, repository, params.export).path
    serve(params, published)
    registry.set_tags_once(client, registry.DETECTOR, version, {PUBLISHED_TAG: f"{MODEL_NAME}/{published.parent.name}"})
    return Release(version, onnx_path, export["sha256"], published, move.previous_champion, export.get("int8_kept"))
