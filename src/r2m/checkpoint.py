"""The checkpoint contract (SPEC section 10): safetensors + a JSON sidecar `<file>.json`.

Backbone tensors live under `backbone.<open_clip visual key>`, the head under `head.weight`
[2, width] and `head.bias` [2]; a pretrained (θ0) file holds backbone keys only. Nothing is ever
unpickled: a specialist may come from outside.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from r2m.errors import CheckpointError
from r2m.fileio import atomic_write, atomic_write_json

BACKBONE_PREFIX = "backbone."
HEAD_KEYS = ("head.weight", "head.bias")


@dataclass
class Checkpoint:
    tensors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)


def sidecar_path(path: Path | str) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def file_sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path | str, data: dict) -> None:
    """Write JSON atomically (temp file + rename), so readers never see half a file."""
    atomic_write_json(path, data)


def save_checkpoint(path: Path | str, tensors: dict[str, torch.Tensor], meta: dict) -> str:
    """Write tensors + sidecar atomically; returns the safetensors file's sha256."""
    path = Path(path)
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(contiguous, str(tmp)))
    sha = file_sha256(path)
    write_json(sidecar_path(path), {**meta, "sha256": sha})
    return sha


def read_meta(path: Path | str) -> dict:
    """The sidecar of a checkpoint; `{}` when it has none."""
    side = sidecar_path(path)
    if not side.is_file():
        return {}
    try:
        meta = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(side, f"sidecar is not valid JSON: {err}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(side, "sidecar must hold a JSON object")
    return meta


def load_checkpoint(path: Path | str, device: str = "cpu") -> Checkpoint:
    """Read a safetensors checkpoint and its sidecar (never pickle)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such checkpoint file")
    try:
        tensors = load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(path, f"not a readable safetensors file: {err}") from None
    return Checkpoint(tensors=tensors, meta=read_meta(path))


def split_backbone_head(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(backbone tensors with the `backbone.` prefix stripped, head tensors keyed `weight`/`bias`)."""
    backbone = {k[len(BACKBONE_PREFIX):]: v for k, v in tensors.items() if k.startswith(BACKBONE_PREFIX)}
    head = {k.split(".", 1)[1]: v for k, v in tensors.items() if k in HEAD_KEYS}
    return backbone, head
