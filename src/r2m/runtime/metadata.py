"""What an exported r2m model carries besides its weights: I/O names and metadata keys, parsed.

Keys of the ONNX `metadata_props`: `r2m.preprocessing` (JSON eval transform), `r2m.lineage` (JSON:
model version, generators covered, gate metrics, checkpoint sha256, ...), `r2m.precision`
(fp32 | int8, and for int8 the scheme: `r2m.quantization`), `r2m.labels`. The write side
(setting them, reading them from a file with `onnx`) is `r2m.export.metadata`; the server reads
them from its ONNX Runtime session (`session.get_modelmeta().custom_metadata_map`).
"""

from __future__ import annotations

import json
from pathlib import Path

from r2m.errors import ExportError

INPUT = "pixel_values"
OUTPUTS = ("logits", "fake_probability")
META_PREPROCESSING = "r2m.preprocessing"
META_LINEAGE = "r2m.lineage"
META_PRECISION = "r2m.precision"
META_QUANTIZATION = "r2m.quantization"
META_LABELS = "r2m.labels"
LABELS = ("real", "fake")  # logit index -> label


def parse_metadata(props: dict[str, str], source: Path | str = "<model>") -> dict:
    """{"preprocessing", "lineage", "precision", "labels"} (+ "quantization" for int8) from raw
    metadata_props; `ExportError` naming `source` when r2m's keys are missing or not JSON."""
    missing = [k for k in (META_PREPROCESSING, META_LINEAGE) if k not in props]
    if missing:
        raise ExportError(f"{source}: ONNX metadata lacks '{missing[0]}' (not exported by r2m export?)")
    try:
        meta = {
            "preprocessing": json.loads(props[META_PREPROCESSING]),
            "lineage": json.loads(props[META_LINEAGE]),
            "precision": props.get(META_PRECISION, "fp32"),
            "labels": json.loads(props.get(META_LABELS, json.dumps(list(LABELS)))),
        }
        if META_QUANTIZATION in props:
            meta["quantization"] = json.loads(props[META_QUANTIZATION])
    except json.JSONDecodeError as err:
        raise ExportError(f"{source}: ONNX metadata is not valid JSON: {err}") from None
    return meta


__all__ = ["INPUT", "LABELS", "META_LABELS", "META_LINEAGE", "META_PRECISION", "META_PREPROCESSING",
           "META_QUANTIZATION", "OUTPUTS", "parse_metadata"]
