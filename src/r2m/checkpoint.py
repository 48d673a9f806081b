"""The checkpoint contract (docs/architecture.md, "Checkpoint contract"): safetensors + a JSON
sidecar `<file>.json`.

Backbone tensors live under `backbone.<open_clip visual key>`, the head under `head.weight`
[2, width] and `head.bias` [2]; a pretrained (θ0) file holds backbone keys only, and half a head
(one of the two) is refused wherever a checkpoint is read. Nothing is ever unpickled: a
specialist may come from outside.

Paths a sidecar records (where a file was imported from, a merge's inputs) are written relative
to the project root when the file lies inside the project, so a moved or copied project keeps
meaningful records; `recorded_path` reads them back (old absolute entries as they are).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from r2m.config import record_path, recorded_path  # noqa: F401  (where sidecars say paths: the one implementation)
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


def missing_file_reason(path: Path | str) -> str:
    """Why `path` is not a readable file: the words for a CheckpointError."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        return "a symbolic link to nothing (dangling, or a symlink loop)"
    if path.is_dir():
        return "is a folder, not a checkpoint file"
    return "no such checkpoint file"


def check_head(keys, source: Path | str, *, required: bool = False) -> bool:
    """Whether `keys` (a checkpoint's tensor names) hold a whole head, `head.weight` and `head.bias`.

    Half a head (one of the two) is a CheckpointError naming the missing key: read as "no head" it
    would be scored with a random one. No head at all is an error when `required` (a specialist)."""
    keys = set(keys)
    present = [k for k in HEAD_KEYS if k in keys]
    if len(present) == 1:
        missing = next(k for k in HEAD_KEYS if k not in keys)
        raise CheckpointError(source, f"half a head: '{present[0]}' without '{missing}' (a specialist has both, "
                                      "a backbone-only θ0 neither)")
    if required and not present:
        raise CheckpointError(source, f"has no head ({', '.join(HEAD_KEYS)}): a specialist needs one")
    return bool(present)


def recorded_theta0(path: Path | str) -> str | None:
    """The θ0 sha256 a checkpoint's sidecar records (`theta0_sha256`), None when it records none.

    A value that is not a string (a number, a list...) is a CheckpointError naming the sidecar and
    the key: a broken record is never waived as "no record"."""
    meta = read_meta(path)
    claimed = meta.get("theta0_sha256")
    if claimed is None:
        return None
    if not isinstance(claimed, str) or not claimed.strip():
        shown = json.dumps(claimed)
        raise CheckpointError(sidecar_path(path), f"'theta0_sha256' is {shown[:40]} ({type(claimed).__name__}), "
                                                  "not the sha256 hex string of a θ0 file")
    return claimed


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
        raise CheckpointError(path, missing_file_reason(path))
    try:
        tensors = load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(path, f"not a readable safetensors file: {err}") from None
    return Checkpoint(tensors=tensors, meta=read_meta(path))


def checkpoint_keys(path: Path | str) -> list[str]:
    """The tensor names of a safetensors checkpoint, from its header (no tensor is read)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, missing_file_reason(path))
    try:
        with safe_open(str(path), framework="pt") as fh:
            return list(fh.keys())
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(path, f"not a readable safetensors file: {err}") from None


def split_backbone_head(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(backbone tensors with the `backbone.` prefix stripped, head tensors keyed `weight`/`bias`)."""
    backbone = {k[len(BACKBONE_PREFIX):]: v for k, v in tensors.items() if k.startswith(BACKBONE_PREFIX)}
    head = {k.split(".", 1)[1]: v for k, v in tensors.items() if k in HEAD_KEYS}
    return backbone, head
