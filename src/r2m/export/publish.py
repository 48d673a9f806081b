"""Publishing to a model repository in Triton's layout (the write side; reading it: `r2m.runtime.repository`).

```
<repository>/r2m_detector/config.pbtxt        generated from the ONNX file's real I/O
<repository>/r2m_detector/<version>/model.onnx versions are increasing integers
```
Triton, KServe's Triton runtime and `r2m serve` all read this layout. Publishing is atomic:
the version is assembled in a hidden temp folder inside the model folder and renamed into
place, so a reader polling the repository sees a version whole or not at all.

Which version is served is said by config.pbtxt itself, in Triton's own terms:
`version_policy: { specific: { versions: [ N ] } }`. Publishing points it at the new version
once that version is in place; `point_serving` points it at an older one (a rollback), so
what is served follows the registry's `champion` both ways, for Triton (poll mode) and for
`r2m serve` alike. The config is rewritten atomically (`r2m.fileio`). Its `max_batch_size`
and `dynamic_batching { max_queue_delay_microseconds }` (from `export.triton_max_batch_size`,
`export.triton_max_queue_delay_us`) tell Triton and `r2m serve` alike how to batch requests.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from r2m.config import ExportConfig
from r2m.errors import ExportError, check_output_file
from r2m.export.metadata import check_model, io_signature, read_metadata
from r2m.fileio import atomic_write, atomic_write_text
from r2m.runtime.repository import (CONFIG_FILE, MODEL_FILE, MODEL_NAME, latest_version, list_versions, model_dir,
                                    served_version)

__all__ = ["CONFIG_FILE", "MODEL_FILE", "MODEL_NAME", "PublishedVersion", "latest_version", "list_versions",
           "model_dir", "point_serving", "publish", "served_version", "triton_config", "version_policy"]

TRITON_DTYPES = {"FLOAT": "TYPE_FP32", "FLOAT16": "TYPE_FP16", "INT64": "TYPE_INT64", "INT32": "TYPE_INT32",
                 "UINT8": "TYPE_UINT8", "BOOL": "TYPE_BOOL"}


@dataclass(frozen=True)
class PublishedVersion:
    name: str
    version: int
    path: Path  # <repository>/<name>/<version>/model.onnx


def _dims(shape: list[int], batched: bool, where: str) -> tuple[list[int], bool]:
    """Triton dims (batch dim dropped when batching); True when a reshape to [] is needed."""
    if batched:
        if not shape or shape[0] != -1:
            raise ExportError(f"{where}: first dimension must be the dynamic batch, got {shape}")
        shape = shape[1:]
    if any(d < 0 for d in shape):
        raise ExportError(f"{where}: only the batch dimension may be dynamic, got {shape}")
    return (shape, False) if shape else ([1], True)  # Triton needs >= 1 dim: [1] reshaped to []


def _tensor_block(io: dict, batched: bool, where: str) -> str:
    dtype = TRITON_DTYPES.get(io["dtype"])
    if dtype is None:
        raise ExportError(f"{where}: tensor '{io['name']}' has dtype {io['dtype']} unknown to Triton")
    dims, reshape = _dims(io["shape"], batched, f"{where}: tensor '{io['name']}'")
    lines = ["  {", f'    name: "{io["name"]}"', f"    data_type: {dtype}", f"    dims: [ {', '.join(map(str, dims))} ]"]
    if reshape:
        lines.append("    reshape: { shape: [ ] }")
    lines.append("  }")
    return "\n".join(lines)


_POLICY = re.compile(r"^version_policy\s*:.*$", re.M)


def version_policy(version: int | None) -> str:
    """The config.pbtxt line choosing the served version (None: Triton's newest)."""
    if version is None:
        return "version_policy: { latest: { num_versions: 1 } }"
    return f"version_policy: {{ specific: {{ versions: [ {int(version)} ] }} }}"


def point_serving(repository: Path | str, version: int, name: str = MODEL_NAME) -> None:
    """Serve published `version` (already complete in the repository): rewrite config.pbtxt's
    version policy, atomically; every other line of the config is kept."""
    folder = model_dir(repository, name)
    if not (folder / str(version) / MODEL_FILE).is_file():
        raise ExportError(f"{folder / str(version)}: no published {MODEL_FILE} to serve")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ExportError(f"{path}: no config.pbtxt; publish a version first")
    text = path.read_text()
    line = version_policy(version)
    text = _POLICY.sub(line, text, count=1) if _POLICY.search(text) else text.rstrip("\n") + f"\n{line}\n"
    atomic_write_text(path, text)


def triton_config(onnx_path: Path | str, cfg: ExportConfig, name: str = MODEL_NAME,
                  instance_kind: str | None = None, version: int | None = None) -> str:
    """config.pbtxt text from the ONNX file's actual input/output names, dtypes and shapes.

    Dynamic batching up to `export.triton_max_batch_size`; one instance group of
    `export.triton_instance_kind` (KIND_AUTO: GPU where present, else CPU); serving `version`
    (None: the newest).
    """
    sig = io_signature(onnx_path)
    batched = cfg.triton_max_batch_size > 0
    kind = instance_kind or cfg.triton_instance_kind
    blocks_in = ",\n".join(_tensor_block(t, batched, str(onnx_path)) for t in sig["inputs"])
    blocks_out = ",\n".join(_tensor_block(t, batched, str(onnx_path)) for t in sig["outputs"])
    preferred = sorted({b for b in (1, 8, cfg.triton_max_batch_size) if b <= cfg.triton_max_batch_size})
    return (
        f'# generated by `r2m publish` from {Path(onnx_path).name}; do not edit by hand\n'
        f'name: "{name}"\n'
        f'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {cfg.triton_max_batch_size}\n"
        f"input [\n{blocks_in}\n]\n"
        f"output [\n{blocks_out}\n]\n"
        f"dynamic_batching {{\n"
        f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n"
        f"  max_queue_delay_microseconds: {cfg.triton_max_queue_delay_us}\n"
        f"}}\n"
        f"instance_group [\n  {{\n    count: {cfg.triton_instance_count}\n    kind: {kind}\n  }}\n]\n"
        f"{version_policy(version)}\n"
    )


def publish(onnx_path: Path | str, repository: Path | str, cfg: ExportConfig, name: str = MODEL_NAME,
            instance_kind: str | None = None, attempts: int = 5, serve: bool = True) -> PublishedVersion:
    """Copy a checked ONNX file into the repository as the next integer version, atomically,
    then point config.pbtxt at it (the server switches once the version is whole). With
    `serve=False` an existing config.pbtxt is left as it is (the served version unchanged)."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ExportError(f"{onnx_path}: no such ONNX file")
    check_model(onnx_path)
    read_metadata(onnx_path)  # refuses files without r2m metadata: the server needs it
    folder = model_dir(repository, name)
    check_output_file(folder / CONFIG_FILE, ExportError, "model repository")
    folder.mkdir(parents=True, exist_ok=True)
    triton_config(onnx_path, cfg, name, instance_kind)  # refuses I/O Triton cannot describe, before copying
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".publish-"))
    try:
        # the file is whole and fsynced (with the umask's permissions) before its folder is renamed into place
        atomic_write(staging / MODEL_FILE, lambda tmp: shutil.copyfile(onnx_path, tmp))
        os.chmod(staging, 0o755)
        for _ in range(attempts):
            taken = [int(p.name) for p in folder.iterdir() if p.name.isdigit()]
            version = max(taken, default=0) + 1
            try:
                os.rename(staging, folder / str(version))  # fails if another publisher took it
            except OSError:
                if not (folder / str(version)).exists():
                    raise
                continue
            if serve or not (folder / CONFIG_FILE).is_file():
                atomic_write_text(folder / CONFIG_FILE, triton_config(onnx_path, cfg, name, instance_kind, version))
            return PublishedVersion(name, version, folder / str(version) / MODEL_FILE)
        raise ExportError(f"{folder}: could not claim a new version after {attempts} attempts")
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
