"""The last steps of the loop, for a candidate that passed the gate: export ONNX with parity,
close the lineage, move `champion`, publish to the model repository.

Every step can be redone after a crash: the ONNX export is reused when its report matches the
candidate's checkpoint, `promote` is a no-op when `champion` already names the version, and a
version already published (found by the checkpoint sha256 in the ONNX metadata) is not
published twice. The server keeps serving the previous version until the new one's folder
appears whole (publishing renames a finished folder into place).
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
from r2m.export.publish import MODEL_NAME, list_versions, model_dir, publish
from r2m.tracking import registry

PUBLISHED_TAG = "published_version"


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
        done = result.as_dict()
    return done


def published_copy(repository: Path, checkpoint_sha256: str) -> Path | None:
    """The published model.onnx exported from this checkpoint, if any."""
    for v in reversed(list_versions(repository)):
        path = model_dir(repository) / str(v) / "model.onnx"
        if read_metadata(path).get("lineage", {}).get("checkpoint_sha256") == checkpoint_sha256:
            return path
    return None


def release(params: Params, client, version: str, checkpoint: Path, checkpoint_sha256: str,
            seen: Sequence[GeneratorDataset], lineage: dict | None = None) -> Release:
    """Export, promote and publish detector `version` (its gate passed)."""
    export = export_candidate(params, checkpoint, checkpoint_sha256, version, seen, lineage or {})
    onnx_path = Path(export["onnx_path"])
    registry.tag_export(client, version, export["sha256"], onnx_path=str(onnx_path),
                        int8_kept=str(export.get("int8_kept")))
    move = registry.promote(client, version)
    repository = params.path("model_repository")
    published = published_copy(repository, checkpoint_sha256)
    if published is None:
        # fp32 is what the gate and the parity check measured; a kept int8 file stays beside it
        published = publish(onnx_path, repository, params.export).path
    client.set_model_version_tag(registry.DETECTOR, version, PUBLISHED_TAG,
                                 f"{MODEL_NAME}/{published.parent.name}")
    return Release(version, onnx_path, export["sha256"], published, move.previous_champion, export.get("int8_kept"))
