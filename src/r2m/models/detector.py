"""Detector = open_clip visual tower (feature: pooled token *before* `proj`) + Linear(width, 2).

The tiny offline backbone is an ordinary open_clip config (`model_configs/r2m-tiny.json`),
registered with open_clip's own config mechanism, so real runs and tests share one factory.
"""

from __future__ import annotations

import atexit
import json
import logging
import re
import shutil
import tempfile
from pathlib import Path

import open_clip
import torch
from open_clip.timm_model import TimmModel
from torch import nn

from r2m.checkpoint import BACKBONE_PREFIX, HEAD_KEYS, check_head, load_checkpoint
from r2m.config import ModelConfig, Params
from r2m.data.transforms import INTERPOLATION
from r2m.errors import CheckpointError
from r2m.models.package_weights import is_package_source

MODEL_CONFIGS = Path(__file__).parent / "model_configs"
_registered = False
_inline_dir: Path | None = None  # this process's copies of sidecar-inline configs (see below)


def register_model_configs() -> None:
    """Make the project's JSON configs (e.g. `r2m-tiny`) known to `open_clip.create_model`."""
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIGS)
        _registered = True


def register_inline_config(name: str, config: dict, source: Path | str = "<sidecar>") -> None:
    """Make an architecture stored in a sidecar (`model.config`, e.g. an imported checkpoint's)
    known to open_clip as `name`, through open_clip's own config-file mechanism."""
    global _inline_dir
    register_model_configs()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise CheckpointError(source, f"model name '{name}' is not a plain config name")
    known = open_clip.get_model_config(name)
    if known is not None:
        if known != config:
            raise CheckpointError(source, f"sidecar's config for model '{name}' differs from the known config of that name")
        return
    if _inline_dir is None:
        _inline_dir = Path(tempfile.mkdtemp(prefix="r2m-model-configs-"))
        atexit.register(shutil.rmtree, _inline_dir, True)
    (_inline_dir / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(_inline_dir / f"{name}.json")
    if open_clip.get_model_config(name) is None:  # open_clip skips configs without these
        raise CheckpointError(source, f"model '{name}': config needs 'embed_dim', 'vision_cfg' and 'text_cfg'")


def sidecar_model_name(model: dict | None, source: Path | str = "<sidecar>") -> str | None:
    """The open_clip name in a sidecar's `model` entry, its inline `config` registered first."""
    if not isinstance(model, dict) or not isinstance(model.get("name"), str):
        return None
    if "config" in model:
        register_inline_config(model["name"], model["config"], source)
    return model["name"]


def pick_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Detector(nn.Module):
    """DF40's CLIP detector: `pooler_output` of the vision tower into a binary linear head."""

    def __init__(self, backbone: nn.Module, width: int):
        super().__init__()
        # convolutional towers run in channels-last layout: about 2x faster on CPU for
        # EfficientNet (oneDNN's depthwise and 1x1 kernels), and what cuDNN prefers too;
        # checkpoints are written contiguous either way (`checkpoint_tensors`)
        self.channels_last = is_timm_tower(backbone)
        if self.channels_last:
            backbone.head = nn.Sequential()  # the feature is the trunk's pooled output, before any projection
            backbone.to(memory_format=torch.channels_last)
        else:
            backbone.proj = None  # the feature is the pooled token before `proj` (DF40's pooler_output)
        self.backbone = backbone
        self.head = nn.Linear(width, 2)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.channels_last and pixel_values.dim() == 4:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        return self.backbone(pixel_values)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Logits [B, 2]; the fake score is softmax(logits)[:, 1]."""
        return self.head(self.features(pixel_values))

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors in the checkpoint contract: `backbone.<open_clip key>`, `head.weight`, `head.bias`."""
        tensors = {BACKBONE_PREFIX + k: v for k, v in self.backbone.state_dict().items()}
        tensors.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    def load_checkpoint_tensors(self, tensors: dict[str, torch.Tensor], source: Path | str = "<memory>") -> None:
        """Load contract tensors; a pretrained file (no head) leaves the head as initialised, half a
        head (`head.weight` without `head.bias`, or the reverse) is a CheckpointError."""
        expected = set(self.checkpoint_tensors())
        given = set(tensors)
        has_head = check_head(given, source)
        missing = expected - given - (set() if has_head else set(HEAD_KEYS))
        if missing:
            raise CheckpointError(source, f"missing key '{sorted(missing)[0]}' ({len(missing)} missing)")
        unknown = given - expected
        if unknown:
            raise CheckpointError(source, f"unexpected key '{sorted(unknown)[0]}' for this model")
        own = self.checkpoint_tensors()
        for key, value in tensors.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise CheckpointError(
                    source, f"key '{key}' has shape {tuple(value.shape)}, model expects {tuple(own[key].shape)}"
                )
        check_loaded_tensors(tensors, own, source)
        backbone = {k[len(BACKBONE_PREFIX):]: v for k, v in tensors.items() if k.startswith(BACKBONE_PREFIX)}
        self.backbone.load_state_dict(backbone, strict=True)
        if has_head:
            self.head.load_state_dict({"weight": tensors["head.weight"], "bias": tensors["head.bias"]})


def is_timm_tower(visual: nn.Module) -> bool:
    """open_clip's timm vision tower (`timm_model_name` in the config), e.g. EfficientNet-Lite."""
    return isinstance(visual, TimmModel)


def feature_width(visual: nn.Module) -> int:
    """Width of the detector's feature: the pooled token before `proj` (ViT), the trunk's pooled
    output (timm towers)."""
    if is_timm_tower(visual):
        return visual.trunk.num_features
    return visual.proj.shape[0] if visual.proj is not None else visual.output_dim


def check_loaded_tensors(tensors: dict[str, torch.Tensor], own: dict[str, torch.Tensor], source: Path | str) -> None:
    """Refuse weights a model would load silently wrong, naming file and key.

    `load_state_dict` casts an integer tensor into a float parameter without a word (merge refuses
    the same file), and a NaN/Inf weight only shows later as "non-finite scores" of a whole task.
    Integer buffers of the model itself (e.g. BatchNorm's `num_batches_tracked`) stay integers.
    """
    for key, value in tensors.items():
        if own[key].is_floating_point() and not value.is_floating_point():
            raise CheckpointError(source, f"key '{key}' is {value.dtype}, expected a floating-point tensor")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(source, f"key '{key}' holds NaN or Inf values")


def _create_visual(model_cfg: ModelConfig) -> nn.Module:
    register_model_configs()
    pretrained = model_cfg.pretrained
    if pretrained and (Path(pretrained).suffix == ".safetensors" or is_package_source(pretrained)):
        pretrained = None  # a local θ0 file or a package's weights: loaded by the caller (r2m.models.pretrained)
    factory_log = logging.getLogger()  # open_clip warns "no pretrained weights" on the root logger
    level = factory_log.level
    if pretrained is None:
        factory_log.setLevel(logging.ERROR)  # expected: θ0 comes from init_seed or a local file
    try:
        clip = open_clip.create_model(model_cfg.name, pretrained=pretrained)
    except RuntimeError as err:  # unknown model name or tag
        from r2m.errors import ConfigError

        raise ConfigError(f"model '{model_cfg.name}' (pretrained={model_cfg.pretrained!r}): {err}") from None
    finally:
        factory_log.setLevel(level)
    return clip.visual


def build_detector(model_cfg: ModelConfig) -> Detector:
    """A detector with the configured backbone and a freshly initialised head (seeded by the caller)."""
    visual = _create_visual(model_cfg)
    return Detector(visual, feature_width(visual))


def load_detector(path: Path | str, model_cfg: ModelConfig | None = None, device: torch.device | str = "cpu",
                  *, require_head: bool = True) -> Detector:
    """A detector with the weights of a checkpoint; the model config comes from its sidecar by default.

    A backbone-only file (θ0) is refused unless `require_head=False` (its features only: the
    head is then untrained and must not score images)."""
    ckpt = load_checkpoint(path)
    if model_cfg is None:
        name = sidecar_model_name(ckpt.meta.get("model"), path)
        if name is None:
            raise CheckpointError(path, "sidecar has no 'model.name'; pass the model config explicitly")
        model_cfg = ModelConfig(name=name)
    else:
        model_cfg = ModelConfig(name=model_cfg.name)  # weights come from the file, never from a hub
    check_head(ckpt.tensors, path)  # half a head is refused before "no head" is considered
    missing_head = [k for k in HEAD_KEYS if k not in ckpt.tensors]
    if missing_head and require_head:  # a pretrained θ0 (backbone only) would be scored with a random head
        raise CheckpointError(path, f"no trained head (no key '{missing_head[0]}'): a backbone-only file such as "
                                    "θ0 cannot score images; give a specialist or merged checkpoint")
    detector = build_detector(model_cfg)
    detector.load_checkpoint_tensors(ckpt.tensors, source=path)
    return detector.to(device).eval()


def image_size(model_name: str) -> int:
    register_model_configs()
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        from r2m.errors import ConfigError

        raise ConfigError(f"unknown open_clip model '{model_name}'")
    size = cfg["vision_cfg"]["image_size"]
    return size if isinstance(size, int) else size[0]


def preprocessing(params: Params) -> dict:
    """What a client must do to an image before the detector: the eval transform, as data."""
    return {
        "image_size": image_size(params.model.name),
        "mean": list(params.train.mean),
        "std": list(params.train.std),
        "interpolation": INTERPOLATION,
    }
