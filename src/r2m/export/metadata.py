"""What an exported r2m model carries besides its weights: I/O names, metadata, checks.

Pure `onnx` (no torch), so the server and the publisher can read it cheaply. Keys:
`r2m.preprocessing` (JSON eval transform), `r2m.lineage` (JSON: model version, generators
covered, gate metrics, checkpoint sha256, ...), `r2m.precision` (fp32 | int8), `r2m.labels`.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx

from r2m.errors import ExportError

INPUT = "pixel_values"
OUTPUTS = ("logits", "fake_probability")
META_PREPROCESSING = "r2m.preprocessing"
META_LINEAGE = "r2m.lineage"
META_PRECISION = "r2m.precision"
META_LABELS = "r2m.labels"
LABELS = ("real", "fake")  # logit index -> label


def set_metadata(model: onnx.ModelProto, entries: dict[str, str]) -> None:
    """Replace/add `metadata_props` entries (values are strings; ours are JSON)."""
    keep = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    for prop in keep:
        model.metadata_props.add(key=prop.key, value=prop.value)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)


def metadata_entries(preprocessing: dict, lineage: dict, precision: str = "fp32") -> dict[str, str]:
    return {
        META_PREPROCESSING: json.dumps(preprocessing, sort_keys=True),
        META_LINEAGE: json.dumps(lineage, sort_keys=True, default=str),
        META_PRECISION: precision,
        META_LABELS: json.dumps(list(LABELS)),
    }


def parse_metadata(props: dict[str, str], source: Path | str = "<model>") -> dict:
    """{"preprocessing", "lineage", "precision", "labels"} from raw metadata_props."""
    missing = [k for k in (META_PREPROCESSING, META_LINEAGE) if k not in props]
    if missing:
        raise ExportError(f"{source}: ONNX metadata lacks '{missing[0]}' (not exported by r2m export?)")
    try:
        return {
            "preprocessing": json.loads(props[META_PREPROCESSING]),
            "lineage": json.loads(props[META_LINEAGE]),
            "precision": props.get(META_PRECISION, "fp32"),
            "labels": json.loads(props.get(META_LABELS, json.dumps(list(LABELS)))),
        }
    except json.JSONDecodeError as err:
        raise ExportError(f"{source}: ONNX metadata is not valid JSON: {err}") from None


def read_metadata(path: Path | str) -> dict:
    """The r2m metadata of an exported file (parsed without loading the weights twice)."""
    model = onnx.load(str(path), load_external_data=False)
    return parse_metadata({p.key: p.value for p in model.metadata_props}, path)


def io_signature(path: Path | str) -> dict:
    """{"inputs": [(name, dtype, shape)], "outputs": [...]} of an ONNX file, -1 for dynamic dims."""
    model = onnx.load(str(path), load_external_data=False)

    def describe(values) -> list[dict]:
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.TensorProto.DataType.Name(t.elem_type), "shape": dims})
        return out

    initializers = {i.name for i in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    return {"inputs": describe(inputs), "outputs": describe(model.graph.output)}


def check_model(path: Path | str) -> None:
    """`onnx.checker` full check (shape inference included); `ExportError` naming the file."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ExportError(f"{path}: onnx.checker failed: {err}") from None
