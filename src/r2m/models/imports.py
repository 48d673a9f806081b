"""Bring your own checkpoints: open_clip, Hugging Face CLIP and DeepfakeBench CLIP detectors
mapped exactly onto the checkpoint contract (docs/architecture.md, "Checkpoint contract"; docs/usage.md,
"Bring your own specialists").

Every source is a ViT visual tower plus, for a specialist, a linear head; the feature is the
pooled token *before* `proj` (DF40's `pooler_output`). Hugging Face's CLIP vision keys map one to
one onto open_clip's, except q/k/v, which open_clip stacks into one `in_proj_weight` in the
order q, k, v. What the weights cannot tell — the activation (OpenAI's CLIP weights use
QuickGELU) and the number of heads — comes from the source's config, θ0's sidecar or a flag.
The result's sidecar carries the open_clip model config inline, so the detector is built from
the file alone (`r2m.models.detector.sidecar_model_name`).

Everything read is checked where it is read, and a fault is a CheckpointError naming the file,
key or flag: shapes before any arithmetic on them, config values by type and range, shard names
inside their folder. A value no file and no flag says, taken from a format's convention (a
DeepfakeBench file's 64-wide heads and QuickGELU), is an *assumption*: `Imported.assumed` lists
it, the sidecar records it under `assumed`, and the CLI prints it with the flag that overrides it.

Safetensors are preferred; `.pth/.pt/.bin` are read with `torch.load(weights_only=True)` only.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from r2m.checkpoint import BACKBONE_PREFIX, file_sha256, missing_file_reason, read_meta, record_path, save_checkpoint
from r2m.config import ModelConfig
from r2m.errors import CheckpointError
from r2m.models.detector import build_detector, register_model_configs, sidecar_model_name

FORMATS = ("open_clip", "hf-clip", "deepfakebench")
ACTIVATIONS = {"quick_gelu": True, "gelu": False}  # name -> open_clip's `quick_gelu` flag
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# the text tower open_clip builds beside the visual one: never used, so as small as it builds
MINIMAL_TEXT_CFG = {"context_length": 2, "vocab_size": 2, "width": 8, "heads": 1, "layers": 1}
_HF_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_HF_ONE_TO_ONE = {
    "embeddings.class_embedding": "class_embedding",
    "embeddings.patch_embedding.weight": "conv1.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "pre_layrnorm.weight": "ln_pre.weight",
    "pre_layrnorm.bias": "ln_pre.bias",
    "post_layernorm.weight": "ln_post.weight",
    "post_layernorm.bias": "ln_post.bias",
}
_HF_LAYER = {
    "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_HF_IGNORED = ("embeddings.position_ids",)  # a buffer transformers 4 saved in some versions
_HF_LAYER_KEY = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_HF_INDEX = "model.safetensors.index.json"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# DeepfakeBench's CLIP towers are OpenAI's: 64-wide heads (its files do not record the count)
_DEEPFAKEBENCH_HEAD_WIDTH = 64


@dataclass
class Architecture:
    """A ViT visual tower as open_clip builds it; the part no weight shape tells is heads and activation."""

    width: int
    layers: int
    patch_size: int
    image_size: int
    mlp_ratio: float
    heads: int
    quick_gelu: bool
    embed_dim: int

    def open_clip_config(self) -> dict:
        return {
            "embed_dim": self.embed_dim,
            "quick_gelu": self.quick_gelu,
            "vision_cfg": {
                "image_size": self.image_size, "layers": self.layers, "width": self.width,
                "head_width": self.width // self.heads, "patch_size": self.patch_size, "mlp_ratio": self.mlp_ratio,
            },
            "text_cfg": dict(MINIMAL_TEXT_CFG),
        }

    def describe(self) -> str:
        act = "quick_gelu" if self.quick_gelu else "gelu"
        return (f"ViT width {self.width}, {self.layers} layers, {self.heads} heads, patch {self.patch_size}, "
                f"{self.image_size} px, mlp ×{self.mlp_ratio:g}, {act}")


@dataclass
class Imported:
    tensors: dict[str, torch.Tensor]  # in the checkpoint contract
    model: dict  # the sidecar's `model` entry: {"name", "config"} (or θ0's entry)
    architecture: Architecture
    meta: dict = field(default_factory=dict)
    # what no file and no flag said, taken from the format's convention: key -> (value, how to override)
    assumed: dict[str, tuple[object, str]] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "specialist" if "head.weight" in self.tensors else "pretrained"


# ------------------------------------------------------------------------- reading files


def _torch_reason(err: BaseException) -> str:
    """torch's message whole, on one line (its terminal escapes and line breaks folded)."""
    text = " ".join(_ANSI.sub("", str(err)).split())
    return text or type(err).__name__


def _torch_load(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only's own refusal: the file holds more than tensors
        raise CheckpointError(path, "refused for safety: r2m reads .pth/.pt/.bin files with torch.load(weights_only=True) "
                                    "only, since unpickling anything else can run code; convert it to .safetensors "
                                    f"where it was made. torch's reason: {_torch_reason(err)}") from None
    except Exception as err:  # RuntimeError, EOFError, OSError...: not a torch file torch can read
        raise CheckpointError(path, f"not a readable torch file ({type(err).__name__}: {_torch_reason(err)})") from None
    # training scripts often wrap the state dict: {"state_dict": {...}, "epoch": ...}
    while isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = [obj[k] for k in ("state_dict", "model", "model_state_dict", "module") if isinstance(obj.get(k), dict)]
        if not inner:
            break
        obj = inner[0]
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"holds a {type(obj).__name__}, not a state dict")
    odd = next((k for k in obj if not isinstance(k, str)), None)
    if odd is not None:
        raise CheckpointError(path, f"key {odd!r} is a {type(odd).__name__}: a state dict's keys are strings")
    return obj


def _shards(folder: Path, index: Path) -> list[Path]:
    """The shard files a `model.safetensors.index.json` names, each a file inside `folder`."""
    try:
        doc = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(index, f"not a readable JSON index: {err}") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(index, "no 'weight_map' object (tensor name -> shard file)")
    odd = next((v for v in weight_map.values() if not isinstance(v, str)), None)
    if odd is not None:
        raise CheckpointError(index, f"'weight_map' names a shard {json.dumps(odd)[:40]}: shard names are strings")
    inside = folder.resolve()
    shards = []
    for name in sorted(set(weight_map.values())):
        target = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts or Path(name).suffix != ".safetensors":
            raise CheckpointError(index, f"shard '{name}' in 'weight_map' is not a .safetensors file name inside {folder}")
        try:
            resolved = target.resolve()
        except (OSError, RuntimeError):
            raise CheckpointError(index, f"shard '{name}': a symlink loop") from None
        if inside not in resolved.parents:
            raise CheckpointError(index, f"shard '{name}' lies outside {folder} (a link to {resolved})")
        shards.append(target)
    return shards


def read_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file (or of a Hugging Face / open_clip model folder), never unpickled."""
    path = Path(path)
    if path.is_dir():
        index = path / _HF_INDEX
        if index.is_file():
            out: dict[str, torch.Tensor] = {}
            for shard in _shards(path, index):
                out.update(read_state_dict(shard))
            return out
        found = next((path / f for f in _HF_FILES if (path / f).is_file()), None)
        if found is None:
            raise CheckpointError(path, f"folder holds none of {', '.join(_HF_FILES)}")
        return read_state_dict(found)
    if not path.is_file():
        raise CheckpointError(path, missing_file_reason(path))
    if path.suffix == ".safetensors":
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(path, f"not a readable safetensors file: {err}") from None
    elif path.suffix in PICKLE_SUFFIXES:
        tensors = _torch_load(path)
    else:
        raise CheckpointError(path, f"unknown checkpoint type '{path.suffix}': expected .safetensors or {', '.join(PICKLE_SUFFIXES)}")
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(path, f"entry '{key}' is a {type(value).__name__}, not a tensor")
    return tensors


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Drop `prefix` when every key has it (DataParallel's `module.`)."""
    if tensors and all(k.startswith(prefix) for k in tensors):
        return {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def read_hf_config(path: Path | str) -> dict:
    """The vision part of a Hugging Face CLIP `config.json` (CLIPConfig or CLIPVisionConfig)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(path, f"not a readable JSON config: {err}") from None
    if not isinstance(doc, dict):
        raise CheckpointError(path, f"holds a JSON {type(doc).__name__}, not a config object")
    vision = doc.get("vision_config", doc)
    if not isinstance(vision, dict):
        raise CheckpointError(path, f"'vision_config' is a JSON {type(vision).__name__}, not an object")
    return vision


# ------------------------------------------------------------------------- key mappings


def hf_vision_to_open_clip(tensors: dict[str, torch.Tensor], source: Path | str) -> dict[str, torch.Tensor]:
    """Hugging Face `CLIPVisionTransformer` keys (flattened, as transformers 5 saves them) ->
    open_clip `VisionTransformer` keys; q, k, v stacked into `attn.in_proj_*` in that order."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key in _HF_IGNORED:
            continue
        if key in _HF_ONE_TO_ONE:
            out[_HF_ONE_TO_ONE[key]] = value
            continue
        match = _HF_LAYER_KEY.fullmatch(key)
        if match is None:
            raise CheckpointError(source, f"unexpected key '{key}' for a Hugging Face CLIP vision tower")
        layer, module, param = int(match[1]), match[2], match[3]
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((layer, param), {})[module[-6]] = value
        elif module in _HF_LAYER:
            out[f"transformer.resblocks.{layer}.{_HF_LAYER[module]}.{param}"] = value
        else:
            raise CheckpointError(source, f"unexpected key '{key}' for a Hugging Face CLIP vision tower")
    for (layer, param), parts in sorted(qkv.items()):
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            raise CheckpointError(source, f"missing key 'encoder.layers.{layer}.self_attn.{missing[0]}_proj.{param}'")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def hf_clip_visual(tensors: dict[str, torch.Tensor], source: Path | str) -> dict[str, torch.Tensor]:
    """A Hugging Face CLIP state dict -> open_clip visual keys. transformers 4 saves the tower
    under `vision_model.` (CLIPVisionModel, CLIPModel), transformers 5 flattens it; the text
    tower of a whole CLIPModel is ignored and `visual_projection` dropped (the feature is before it)."""
    tensors = _strip(tensors, "module.")
    if any(k.startswith("vision_model.") for k in tensors):
        tensors = {k[len("vision_model."):]: v for k, v in tensors.items() if k.startswith("vision_model.")}
    else:
        tensors = {k: v for k, v in tensors.items()
                   if not k.startswith(("visual_projection.", "text_model.", "text_projection.")) and k != "logit_scale"}
    return hf_vision_to_open_clip(tensors, source)


def open_clip_visual(tensors: dict[str, torch.Tensor], source: Path | str) -> dict[str, torch.Tensor]:
    """An open_clip state dict (whole CLIP with `visual.` keys, or the visual tower alone) ->
    visual keys without `proj` (the feature is the pooled token before it)."""
    tensors = _strip(tensors, "module.")
    if any(k.startswith("visual.") for k in tensors):
        tensors = {k[len("visual."):]: v for k, v in tensors.items() if k.startswith("visual.")}
    return tensors


def deepfakebench_clip(tensors: dict[str, torch.Tensor], source: Path | str) -> tuple[dict, dict]:
    """DeepfakeBench's CLIP detector (`training/detectors/clip_detector.py`): `backbone.` = the
    Hugging Face `CLIPVisionTransformer`, `head.` = `nn.Linear(width, 2)`. -> (visual, head)."""
    tensors = _strip(tensors, "module.")
    backbone = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
    head = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
    other = sorted(k for k in tensors if not k.startswith(("backbone.", "head.")))
    if other:
        raise CheckpointError(source, f"unexpected key '{other[0]}' for a DeepfakeBench CLIP detector "
                                      "(expected backbone.* and head.*)")
    if not backbone:
        raise CheckpointError(source, "no 'backbone.' keys: not a DeepfakeBench CLIP detector")
    return hf_vision_to_open_clip(backbone, source), head


def linear_head(tensors: dict[str, torch.Tensor], width: int, source: Path | str) -> tuple[dict[str, torch.Tensor], int]:
    """(`head.weight` [2, width] and `head.bias` [2], the source's number of outputs) from one
    Linear's weight and bias. A one-logit head z (fake probability sigmoid(z)) becomes [0, z],
    whose softmax gives the same fake probability."""
    weights = [k for k in tensors if k == "weight" or k.endswith(".weight")]
    biases = [k for k in tensors if k == "bias" or k.endswith(".bias")]
    if len(weights) != 1 or len(biases) != 1 or len(tensors) != 2:
        raise CheckpointError(source, f"a head must hold one Linear's weight and bias, found keys {sorted(tensors)[:4]}")
    weight, bias = tensors[weights[0]].float(), tensors[biases[0]].float()
    outputs = weight.shape[0] if weight.ndim == 2 else 0
    if weight.ndim != 2 or weight.shape[1] != width or outputs not in (1, 2) or tuple(bias.shape) != (outputs,):
        raise CheckpointError(source, f"head '{weights[0]}' has shape {tuple(weight.shape)} (bias {tuple(bias.shape)}); "
                                      f"expected [2, {width}] or [1, {width}] with a matching bias")
    if outputs == 1:
        weight, bias = torch.cat([torch.zeros_like(weight), weight]), torch.cat([torch.zeros_like(bias), bias])
    return {"head.weight": weight, "head.bias": bias}, outputs


# ------------------------------------------------------------------------- architecture


def _whole_number(value, what: str, source: Path | str, *, low: int = 1) -> int:
    """`value` if it is an integer ≥ `low` (JSON's 2.0 counts, True does not); else an error naming `what`."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise CheckpointError(source, f"{what} is {json.dumps(value, default=str)[:40]}: expected a whole number ≥ {low}")
    return value


def _shape(visual: dict[str, torch.Tensor], key: str, dims: str, source: Path | str) -> tuple[int, ...]:
    """The shape of `visual[key]`, which must have the named dimensions (`dims`, e.g. "[width]"),
    none of them zero: what the architecture is read from is checked before any arithmetic."""
    if key not in visual:
        raise CheckpointError(source, f"missing key '{key}': r2m imports ViT visual towers only")
    shape = tuple(visual[key].shape)
    if len(shape) != dims.count(",") + 1 or 0 in shape:
        raise CheckpointError(source, f"key '{key}' has shape {list(shape)}: expected {dims}, no dimension 0")
    return shape


def infer_shapes(visual: dict[str, torch.Tensor], source: Path | str) -> dict:
    """What the weight shapes of an open_clip ViT visual tower tell about its architecture."""
    for key in ("conv1.weight", "class_embedding", "positional_embedding"):
        if key not in visual:
            raise CheckpointError(source, f"missing key '{key}': r2m imports ViT visual towers only")
    (width,) = _shape(visual, "class_embedding", "[width]", source)
    conv = _shape(visual, "conv1.weight", "[width, 3, patch, patch]", source)
    patch = conv[-1]
    if conv[-2] != patch:
        raise CheckpointError(source, f"key 'conv1.weight' has shape {list(conv)}: patches must be square")
    positions = _shape(visual, "positional_embedding", "[1 + tokens, width]", source)
    tokens = positions[0] - 1
    grid = math.isqrt(tokens)
    if tokens < 1 or grid * grid != tokens:
        raise CheckpointError(source, f"positional_embedding has {tokens + 1} tokens: not 1 + a square grid")
    blocks = {int(m[1]) for k in visual if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))}
    if not blocks or blocks != set(range(len(blocks))):
        raise CheckpointError(source, "no consecutive transformer.resblocks.N layers")
    fc = _shape(visual, "transformer.resblocks.0.mlp.c_fc.weight", "[hidden, width]", source)
    return {"width": width, "layers": len(blocks), "patch_size": patch, "image_size": grid * patch,
            "mlp_ratio": fc[0] / width}


def vision_architecture(config: dict, source: Path | str = "<config>") -> dict:
    """The ViT architecture an open_clip model config describes (open_clip's defaults filled in);
    a value of the wrong type or range is an error naming `source` and the key."""
    vision = config.get("vision_cfg", {}) if isinstance(config, dict) else None
    if not isinstance(vision, dict):
        raise CheckpointError(source, "model config has no 'vision_cfg' object")
    width = _whole_number(vision.get("width", 768), "vision_cfg.width", source)
    head_width = _whole_number(vision.get("head_width", 64), "vision_cfg.head_width", source)
    size = vision.get("image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) and size else size
    ratio = vision.get("mlp_ratio", 4.0)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0:
        raise CheckpointError(source, f"vision_cfg.mlp_ratio is {json.dumps(ratio, default=str)[:40]}: expected a number > 0")
    return {
        "width": width, "layers": _whole_number(vision.get("layers", 12), "vision_cfg.layers", source),
        "patch_size": _whole_number(vision.get("patch_size", 16), "vision_cfg.patch_size", source),
        "image_size": _whole_number(size, "vision_cfg.image_size", source), "mlp_ratio": float(ratio),
        "heads": width // head_width if width % head_width == 0 else None,
        "quick_gelu": bool(config.get("quick_gelu", False)),
    }


def model_config(model: dict, source: Path | str) -> dict:
    """The open_clip config of a sidecar `model` entry (inline, or registered under its name)."""
    name = sidecar_model_name(model, source)
    if name is None:
        raise CheckpointError(source, "sidecar has no 'model.name'")
    register_model_configs()
    config = open_clip.get_model_config(name)
    if config is None:
        raise CheckpointError(source, f"unknown open_clip model '{name}'")
    return config


def _hf_architecture(hf_config: dict, source: Path | str) -> dict:
    """Activation and heads from a Hugging Face vision config, each value checked by type and range."""
    out = {}
    if "hidden_act" in hf_config:
        act = hf_config["hidden_act"]
        if not isinstance(act, str) or act not in ACTIVATIONS:
            raise CheckpointError(source, f"hidden_act {json.dumps(act, default=str)[:40]}: open_clip towers use "
                                          "quick_gelu or gelu")
        out["quick_gelu"] = ACTIVATIONS[act]
    if "num_attention_heads" in hf_config:
        out["heads"] = _whole_number(hf_config["num_attention_heads"], "num_attention_heads", source)
    eps = hf_config.get("layer_norm_eps", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise CheckpointError(source, f"layer_norm_eps is {json.dumps(eps, default=str)[:40]}: expected a number (1e-5)")
    if not abs(eps - 1e-5) <= 1e-12:
        raise CheckpointError(source, f"layer_norm_eps {eps}: open_clip's LayerNorm uses 1e-5")
    return out


def resolve_architecture(shapes: dict, embed_dim: int, source: Path | str, *, given: dict,
                         defaults: list[tuple[str, dict]]) -> tuple[Architecture, dict[str, str]]:
    """Heads and activation: a flag wins, else the first of `defaults` (source config, θ0,
    `--model`, the format's convention) that says; none saying is an error naming the flag.
    Returns the architecture and, per key, who said it (the flag, or the default's label)."""
    arch = dict(shapes)
    said_by: dict[str, str] = {}
    missing = []
    for key, flag, what in (("heads", "--heads", "number of heads"), ("quick_gelu", "--act", "activation")):
        said, label = given.get(key), flag
        if said is None:
            said, label = next(((d[key], lbl) for lbl, d in defaults if d.get(key) is not None), (None, None))
        if said is None:
            missing.append((flag, what))
        arch[key], said_by[key] = said, label
    if missing:
        raise CheckpointError(source, f"the weights do not tell the {' or the '.join(w for _, w in missing)}: pass "
                                      f"{' and '.join(f for f, _ in missing)} (or --pretrained θ0, --model NAME, the Hugging Face config)")
    if arch["width"] % arch["heads"]:
        raise CheckpointError(source, f"width {arch['width']} is not divisible by {arch['heads']} heads ({said_by['heads']})")
    return Architecture(embed_dim=embed_dim, **arch), said_by


def inline_model(arch: Architecture) -> dict:
    """The sidecar `model` entry: a name derived from the config, and the config itself."""
    config = arch.open_clip_config()
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    return {"name": f"r2m-import-{digest}", "config": config}


def _assumptions(arch: Architecture, said_by: dict[str, str], convention: str) -> dict[str, tuple[object, str]]:
    """What came from the format's convention, not from a file or a flag: key -> (value, the line
    that says so and how to override it)."""
    out: dict[str, tuple[object, str]] = {}
    if said_by.get("heads") == convention:
        out["heads"] = (arch.heads, f"heads = {arch.heads}: the file does not record it; assumed {convention}'s "
                                    f"{_DEEPFAKEBENCH_HEAD_WIDTH}-wide heads (width {arch.width} / {_DEEPFAKEBENCH_HEAD_WIDTH}, "
                                    "as in OpenAI's CLIP towers). If this tower differs, pass --heads N "
                                    "(or --model NAME, or --pretrained θ0)")
    if said_by.get("quick_gelu") == convention:
        act = "quick_gelu" if arch.quick_gelu else "gelu"
        out["act"] = (act, f"activation = {act}: the file does not record it; assumed {convention}'s QuickGELU "
                           "(OpenAI's CLIP weights). If it was trained with GELU, pass --act gelu "
                           "(or --model NAME, or --pretrained θ0)")
    return out


# ------------------------------------------------------------------------- the import


def import_checkpoint(
    src: Path | str,
    fmt: str,
    *,
    head: Path | str | None = None,
    pretrained: Path | str | None = None,
    heads: int | None = None,
    act: str | None = None,
    model_name: str | None = None,
    hf_config: Path | str | None = None,
    generator: str | None = None,
) -> Imported:
    """Map a foreign checkpoint onto the contract; checked by loading it into the detector it names.

    Every input is checked before it is used: flags first, then each file exists before anything
    in it (its sidecar, its θ0 record) is read."""
    src = Path(src)
    if fmt not in FORMATS:
        raise CheckpointError(src, f"unknown format '{fmt}': expected one of {', '.join(FORMATS)}")
    if act is not None and act not in ACTIVATIONS:
        raise CheckpointError(src, f"--act '{act}': expected quick_gelu or gelu")
    if heads is not None:
        _whole_number(heads, "--heads", src)
    for flag, path in (("--pretrained", pretrained), ("--head", head), ("--config", hf_config)):
        if path is not None and not Path(path).is_file():
            raise CheckpointError(path, f"{flag}: {missing_file_reason(path).replace('checkpoint file', 'file')}")
    tensors = read_state_dict(src)
    own_head: dict[str, torch.Tensor] = {}
    source_says: dict = {}
    if fmt == "open_clip":
        visual = open_clip_visual(tensors, src)
    elif fmt == "hf-clip":
        visual = hf_clip_visual(tensors, src)
        config_file = Path(hf_config) if hf_config else (src / "config.json" if src.is_dir() else None)
        if config_file is not None:
            source_says = _hf_architecture(read_hf_config(config_file), config_file)
    else:
        visual, own_head = deepfakebench_clip(tensors, src)
        if own_head and head is not None:
            raise CheckpointError(src, "has its own head.* keys; drop --head")
    proj = visual.pop("proj", None)
    shapes = infer_shapes(visual, src)
    width = shapes["width"]
    if proj is not None and (proj.ndim != 2 or proj.shape[0] != width or proj.shape[1] < 1):
        raise CheckpointError(src, f"key 'proj' has shape {list(proj.shape)}: expected [{width}, embed_dim]")

    defaults: list[tuple[str, dict]] = [("the source's config", source_says)]
    theta0_meta: dict = {}
    if pretrained is not None:
        theta0_meta = read_meta(pretrained)
        if not isinstance(theta0_meta.get("model"), dict):
            raise CheckpointError(pretrained, "θ0 has no r2m sidecar with a 'model' entry: import θ0 first "
                                              "(`r2m import-checkpoint` without --pretrained)")
        defaults.append((f"θ0 {pretrained}", vision_architecture(model_config(theta0_meta["model"], pretrained), pretrained)))
    if model_name is not None:
        register_model_configs()
        named = open_clip.get_model_config(model_name)
        if named is None or "timm_model_name" in named.get("vision_cfg", {}):
            raise CheckpointError(src, f"--model '{model_name}': not a known open_clip ViT config")
        defaults.append((f"--model {model_name}", vision_architecture(named, f"--model {model_name}")))
    whole = defaults[1:]  # θ0 and --model describe the whole tower: it must be exactly this one
    convention = "DeepfakeBench"
    if fmt == "deepfakebench":  # its CLIP backbones are OpenAI's: QuickGELU, 64-wide heads
        fits = width % _DEEPFAKEBENCH_HEAD_WIDTH == 0
        defaults.append((convention, {"quick_gelu": True, "heads": width // _DEEPFAKEBENCH_HEAD_WIDTH if fits else None}))
    given = {"heads": heads, "quick_gelu": ACTIVATIONS[act] if act else None}
    arch, said_by = resolve_architecture(shapes, proj.shape[1] if proj is not None else width, src, given=given,
                                         defaults=defaults)
    for label, said in whole:
        differs = [k for k in said if said[k] is not None and getattr(arch, k) != said[k]]
        if differs:
            raise CheckpointError(src, f"{differs[0]} is {getattr(arch, differs[0])} here but {said[differs[0]]} in {label}")
    assumed = _assumptions(arch, said_by, convention)

    contract = {BACKBONE_PREFIX + k: v.float() if v.is_floating_point() else v for k, v in visual.items()}
    head_outputs = None
    if own_head or head is not None:
        head_tensors, head_outputs = linear_head(own_head or read_state_dict(head), width, src if own_head else head)
        contract.update(head_tensors)
    if pretrained is not None and "head.weight" not in contract:
        raise CheckpointError(src, "a specialist needs a head: pass --head FILE (or leave out --pretrained to import θ0)")
    model = dict(theta0_meta["model"]) if pretrained is not None else inline_model(arch)

    detector = build_detector(ModelConfig(name=sidecar_model_name(model, src)))
    detector.load_checkpoint_tensors(contract, source=src)  # every key and shape, or the one at fault
    meta = {
        "model": model,
        "imported": {
            "format": fmt, "source": record_path(src), "source_sha256": file_sha256(src) if src.is_file() else None,
            "architecture": arch.describe(), "head": record_path(head) if head is not None else ("own" if own_head else None),
            "head_outputs": head_outputs,
        },
        "assumed": {key: value for key, (value, _) in assumed.items()},
    }
    if pretrained is not None:
        meta["theta0_sha256"] = file_sha256(pretrained)
        meta["pretrained"] = record_path(pretrained)
    if generator:
        meta["generator"] = generator
    return Imported(tensors=contract, model=model, architecture=arch, meta=meta, assumed=assumed)


def write_imported(imported: Imported, out: Path | str) -> str:
    """Save in the contract with its sidecar (kind pretrained or specialist); returns the sha256."""
    return save_checkpoint(out, imported.tensors, {"kind": imported.kind, **imported.meta})
