"""The r2m metadata of an exported file, write side and file checks (pure `onnx`, no torch).

The names and the parsing are `r2m.runtime.metadata` (what the server reads); this module sets
them on a model, reads them from a file without loading its weights, and checks files.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx

from r2m.errors import ExportError
from r2m.runtime.metadata import (INPUT, LABELS, META_LABELS, META_LINEAGE, META_PRECISION, META_PREPROCESSING,
                                  META_QUANTIZATION, OUTPUTS, parse_metadata)

__all__ = ["INPUT", "LABELS", "META_LABELS", "META_LINEAGE", "META_PRECISION", "META_PREPROCESSING",
           "META_QUANTIZATION", "OUTPUTS", "check_model", "io_signature", "metadata_entries", "parse_metadata",
           "read_metadata", "set_metadata"]


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


def check_model(path: Path | str, name: Path | str | None = None) -> None:
    """`onnx.checker` full check (shape inference included); `ExportError` naming `name` (default:
    the file checked, e.g. the final path of a temporary file being written)."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ExportError(f"{name or path}: onnx.checker failed: {err}") from None
