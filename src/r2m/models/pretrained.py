"""θ0: the shared pretrained backbone every specialist starts from, written once and hashed.

Real runs get CLIP weights through open_clip (`model.pretrained: openai`) or a local weights
file; the tiny offline backbone is initialised from `model.init_seed`. Either way θ0 is frozen
into `artifacts/pretrained/<model>.safetensors` and its sha256 identifies it: every specialist
records that hash, and merging refuses specialists of another θ0.
"""

from __future__ import annotations

from pathlib import Path

import torch

from r2m.checkpoint import BACKBONE_PREFIX, file_sha256, load_checkpoint, read_meta, save_checkpoint
from r2m.config import Params
from r2m.errors import CheckpointError
from r2m.models.detector import build_detector


def pretrained_path(params: Params) -> Path:
    return params.path("artifacts") / "pretrained" / f"{params.model.name}.safetensors"


def _describe(params: Params) -> dict:
    return {"name": params.model.name, "pretrained": params.model.pretrained, "init_seed": params.model.init_seed}


def ensure_pretrained(params: Params) -> Path:
    """Write θ0 once and return its path; later calls check it still matches the config."""
    path = pretrained_path(params)
    if path.is_file():
        meta = read_meta(path)
        if meta.get("model") != _describe(params):
            raise CheckpointError(path, f"θ0 was written for {meta.get('model')}, params.yaml asks for {_describe(params)}")
        if meta.get("sha256") != file_sha256(path):
            raise CheckpointError(path, "θ0 file changed since it was written (sha256 mismatch)")
        return path
    torch.manual_seed(params.model.init_seed)
    detector = build_detector(params.model)
    source = params.model.pretrained
    if source and Path(source).suffix == ".safetensors":
        tensors = load_checkpoint(source).tensors
        tensors = {k if k.startswith(BACKBONE_PREFIX) else BACKBONE_PREFIX + k: v for k, v in tensors.items()}
        tensors = {k: v for k, v in tensors.items() if k.startswith(BACKBONE_PREFIX)}
        detector.load_checkpoint_tensors(tensors, source=source)
    backbone = {k: v for k, v in detector.checkpoint_tensors().items() if k.startswith(BACKBONE_PREFIX)}
    save_checkpoint(path, backbone, {"kind": "pretrained", "model": _describe(params)})
    return path
