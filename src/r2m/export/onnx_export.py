"""ONNX export of the merged detector, with its metadata and the parity check (deploy/README.md, "The model").

One graph: merged backbone + averaged head, input `pixel_values` [B, 3, H, W] float32 with a
dynamic batch, outputs `logits` [B, 2] and `fake_probability` [B] = softmax(logits)[:, 1].
The eval transform (`r2m.preprocessing`) and the lineage (`r2m.lineage`: model version,
generators covered, gate metrics, checkpoint sha256) travel inside the file as ONNX
`metadata_props`, so whoever serves the file needs nothing else.

Every export is checked: `onnx.checker` (full check), then ONNX Runtime against torch on a
random batch (max |Δlogit| <= `export.parity_atol`) and, given datasets, on a sample of each
test split (AUC equal within `export.parity_auc_tolerance`). A failed check leaves no file. The
JSON report beside the file names files relative to the project root when they lie inside it.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import torch
from torch import nn

from r2m.checkpoint import file_sha256, read_meta
from r2m.config import ExportConfig, ModelConfig, Params, record_path
from r2m.data import balanced_sample
from r2m.errors import ExportError, check_output_file
from r2m.evaluation.metrics import auc
from r2m.export.metadata import INPUT, OUTPUTS, check_model, metadata_entries, set_metadata
from r2m.fileio import atomic_write, atomic_write_json
from r2m.runtime.session import open_session


class ScoringGraph(nn.Module):
    """Detector + softmax: (logits [B, 2], fake_probability [B]) from pixel_values [B, 3, H, W]."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.detector(pixel_values)
        return logits, torch.softmax(logits, dim=-1)[:, 1]


@dataclass
class TaskParity:
    """Torch vs ONNX Runtime on one dataset's test sample."""

    task: str
    n: int
    auc_torch: float
    auc_onnx: float
    max_abs_diff: float


@dataclass
class ExportResult:
    """What an export produced and measured; `as_dict()` is written next to the file as JSON."""

    onnx_path: Path
    sha256: str
    max_abs_diff: float
    parity: list[TaskParity] = field(default_factory=list)
    int8_path: Path | None = None
    int8_sha256: str | None = None
    int8_recipe: dict = field(default_factory=dict)  # the scheme (and calibration) tried; `Int8Recipe.describe()`
    int8_auc: dict[str, float] = field(default_factory=dict)  # seen task -> int8 AUC on its test split
    int8_fp32_auc: dict[str, float] = field(default_factory=dict)  # ... and the fp32 file's on the same images
    int8_kept: bool | None = None  # None: not attempted
    int8_reason: str = ""
    lineage: dict = field(default_factory=dict)
    preprocessing: dict = field(default_factory=dict)

    @property
    def int8_delta_auc(self) -> dict[str, float]:
        """AUC_int8 − AUC_fp32 per seen task."""
        return {t: self.int8_auc[t] - self.int8_fp32_auc[t] for t in self.int8_auc if t in self.int8_fp32_auc}

    def as_dict(self, root: Path | str | None = None) -> dict:
        """JSON-ready; paths relative to `root` (the project root) when they lie inside it."""
        data = asdict(self)
        data["onnx_path"] = record_path(self.onnx_path, root)
        data["int8_path"] = record_path(self.int8_path, root) if self.int8_path else None
        data["int8_delta_auc"] = self.int8_delta_auc
        return data


# ---------------------------------------------------------------- lineage


def lineage_from_meta(meta: dict, checkpoint_sha256: str, model_version: str | None = None) -> dict:
    """The lineage recorded in the ONNX file, from a checkpoint's sidecar.

    Tolerant of the sidecar's shape: generators come from `generators`, else from the
    `specialists` list, else from a single `generator`; gate metrics from `gate`, else `metrics`.
    """
    generators = meta.get("generators")
    if not generators and isinstance(meta.get("specialists"), list):
        generators = [s.get("generator") if isinstance(s, dict) else str(s) for s in meta["specialists"]]
    if not generators and meta.get("generator"):
        generators = [meta["generator"]]
    version = model_version or meta.get("model_version") or meta.get("version") or checkpoint_sha256[:12]
    return {
        "model_version": str(version),
        "generators": sorted(str(g) for g in (generators or []) if g),
        "gate_metrics": meta.get("gate") or meta.get("metrics") or {},
        "checkpoint_sha256": checkpoint_sha256,
        "theta0_sha256": meta.get("theta0_sha256"),
        "kind": meta.get("kind"),
        "recipe": meta.get("recipe"),
        "model": meta.get("model"),
    }


# ---------------------------------------------------------------- export


def trace_to_onnx(graph: nn.Module, example: torch.Tensor, opset: int, exporter: str = "dynamo") -> onnx.ModelProto:
    """torch -> ONNX with a dynamic batch. `dynamo`: torch.export-based (torch's default since 2.9);
    `torchscript`: the legacy tracer, deprecated but ~10x faster to export on CPU."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            buffer = io.BytesIO()
            torch.onnx.export(graph, (example,), buffer, input_names=[INPUT], output_names=list(OUTPUTS),
                              dynamic_axes={name: {0: "batch"} for name in (INPUT, *OUTPUTS)},
                              dynamo=False, opset_version=opset)
            return onnx.load_from_string(buffer.getvalue())
        batch = torch.export.Dim("batch", min=1)
        program = torch.onnx.export(graph, (example,), input_names=[INPUT], output_names=list(OUTPUTS),
                                    dynamic_shapes={INPUT: {0: batch}}, dynamo=True, opset_version=opset,
                                    external_data=False, verbose=False)
        return program.model_proto


def export_graph(detector: nn.Module, out: Path | str, image_size: int, preprocessing: dict, lineage: dict,
                 opset: int = 18, exporter: str = "dynamo") -> Path:
    """Trace `detector` + softmax (dynamic batch), add metadata, check, save.

    Written atomically (`r2m.fileio`), so `out` is either absent or a complete, checked model.
    """
    out = Path(out)
    graph = ScoringGraph(detector.cpu().eval()).eval()
    example = torch.zeros(2, 3, image_size, image_size)
    try:
        model = trace_to_onnx(graph, example, opset, exporter)
    except Exception as err:  # the exporters raise many types
        raise ExportError(f"{out}: torch.onnx.export ({exporter}) failed: {type(err).__name__}: {err}") from None
    model.producer_name = "r2m"
    model.doc_string = "r2m deepfake detector: pixel_values -> logits [B,2], fake_probability [B]"
    set_metadata(model, metadata_entries(preprocessing, lineage))

    def write(tmp: Path) -> None:
        onnx.save(model, str(tmp))
        check_model(tmp, out)

    return atomic_write(out, write)


# ---------------------------------------------------------------- parity


def parity_batch(image_size: int, preprocessing: dict, n: int, seed: int = 0) -> torch.Tensor:
    """Random pixels in [0, 1], normalised like real images: the range the model will see."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, image_size, image_size, generator=gen)
    mean = torch.tensor(preprocessing["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing["std"]).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def torch_logits(detector: nn.Module, x: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    detector = detector.cpu().eval()
    return torch.cat([detector(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).numpy()


def onnx_logits(session: Any, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
    return np.concatenate([session.run([OUTPUTS[0]], {INPUT: x[i : i + batch_size]})[0]
                           for i in range(0, len(x), batch_size)])


def check_logit_parity(session: Any, detector: nn.Module, x: torch.Tensor, atol: float,
                       source: Path | str) -> float:
    """max |Δlogit| between ONNX Runtime and torch on `x`; `ExportError` above `atol`."""
    diff = float(np.abs(onnx_logits(session, x.numpy()) - torch_logits(detector, x)).max())
    if not np.isfinite(diff) or diff > atol:
        raise ExportError(
            f"{source}: parity failed: max |logit_onnx - logit_torch| = {diff:.3g} > export.parity_atol = {atol:g}"
        )
    return diff


def softmax_fake(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e[:, 1] / e.sum(axis=1)


def check_task_parity(session: Any, detector: nn.Module, task: str, samples: Sequence,
                      train_transform, serve_preprocess, cfg: ExportConfig, source: Path | str) -> TaskParity:
    """Torch on training's eval transform vs ONNX Runtime on the server's preprocessing.

    Both paths score the same test images; AUCs must agree within `export.parity_auc_tolerance`.
    """
    from r2m.data import load_image

    sample = balanced_sample(samples, cfg.parity_samples)
    labels = np.array([s.label for s in sample])
    if len(set(labels.tolist())) < 2:
        raise ExportError(f"{source}: parity needs real and fake test images; task '{task}' has one class only")
    images = [load_image(s.path) for s in sample]
    x_torch = torch.stack([train_transform(img) for img in images])
    x_onnx = np.stack([serve_preprocess(img) for img in images])
    logits_torch = torch_logits(detector, x_torch)
    logits_onnx = onnx_logits(session, x_onnx)
    diff = float(np.abs(logits_onnx - logits_torch).max())
    auc_t, auc_o = auc(labels, softmax_fake(logits_torch), task), auc(labels, softmax_fake(logits_onnx), task)
    if abs(auc_t - auc_o) > cfg.parity_auc_tolerance + 1e-12 or diff > cfg.parity_atol:
        raise ExportError(
            f"{source}: parity failed on task '{task}' ({len(sample)} test images): AUC torch {auc_t:.6f} "
            f"vs onnx {auc_o:.6f} (export.parity_auc_tolerance = {cfg.parity_auc_tolerance:g}), "
            f"max |Δlogit| {diff:.3g} (export.parity_atol = {cfg.parity_atol:g})"
        )
    return TaskParity(task, len(sample), auc_t, auc_o, diff)


# ---------------------------------------------------------------- the verb


def _preprocessing_for(params: Params, model_name: str) -> dict:
    from r2m.models import preprocessing

    return preprocessing(params.model_copy(update={"model": ModelConfig(name=model_name)}))


def export_checkpoint(model_path: Path | str, out: Path | str, params: Params, datasets: Sequence = (),
                      int8: bool | None = None, model_version: str | None = None,
                      lineage_extra: dict | None = None) -> ExportResult:
    """`r2m export`: checkpoint -> checked ONNX file (+ optional int8 challenger) + `<out>.json` report.

    `datasets` are validated `GeneratorDataset`s (seen tasks): their test splits drive the AUC
    parity check and the int8 decision. On any failed check the outputs are removed.
    """
    from r2m.data import build_transform
    from r2m.export.quantize import int8_challenger
    from r2m.models import load_detector
    from r2m.runtime.preprocess import Preprocessing

    model_path, out = Path(model_path), check_output_file(out, ExportError)
    cfg = params.export
    int8 = cfg.int8 if int8 is None else int8
    meta = read_meta(model_path)
    detector = load_detector(model_path)  # model config from the sidecar
    model_name = (meta.get("model") or {}).get("name", params.model.name)
    prep = _preprocessing_for(params, model_name)
    sha = file_sha256(model_path)
    lineage = {**lineage_from_meta(meta, sha, model_version), **(lineage_extra or {})}
    lineage["datasets"] = {d.name: d.data_hash for d in datasets}
    threads = max(1, torch.get_num_threads())  # 1 in tests; all cores otherwise

    export_graph(detector, out, prep["image_size"], prep, lineage, cfg.opset, cfg.exporter)
    try:
        session = open_session(out, threads, providers=["CPUExecutionProvider"])
        x = parity_batch(prep["image_size"], prep, cfg.parity_batch)
        result = ExportResult(out, file_sha256(out), check_logit_parity(session, detector, x, cfg.parity_atol, out),
                              lineage=lineage, preprocessing=prep)
        transform = build_transform(False, prep["image_size"], params.train)
        serve_preprocess = Preprocessing.from_dict(prep)
        for ds in datasets:
            result.parity.append(check_task_parity(session, detector, ds.name, ds.split("test"), transform,
                                                   serve_preprocess, cfg, out))
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    if int8:
        int8_challenger(result, [ds for ds in datasets if ds.is_seen], cfg, threads)
    atomic_write_json(report_path(out), result.as_dict(params.root))
    return result


def report_path(onnx_path: Path | str) -> Path:
    path = Path(onnx_path)
    return path.with_name(path.name + ".json")
