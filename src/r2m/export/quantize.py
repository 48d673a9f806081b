"""The int8 challenger of an fp32 export, with ONNX Runtime's quantisation tools.

Two schemes (`export.int8_scheme`), both `onnxruntime.quantization` after its recommended
pre-pass (`quant_pre_process`: shape inference, graph optimisation, BatchNorm folded):

- `static` (the default): QDQ format, int8 per-channel weights, uint8 activations (ONNX Runtime's
  choice for x86 CPUs) whose ranges are calibrated (`export.int8_calibration`: ONNX Runtime's
  MinMax, Entropy or Percentile) on up to `export.int8_calibration_samples` images of the seen
  tasks' **validation** splits, never test or unseen images. Shape arithmetic and the detector's
  head stay float (`float_nodes`).
- `dynamic`: int8 weights, activations quantised on the fly; no calibration data.

The int8 file is kept only when |AUC_int8 − AUC_fp32| ≤ `export.int8_auc_tolerance` on the test
split of every seen task (the test splits check, they choose nothing); else it is deleted and the
reason recorded. The parity report records the scheme and every task's ΔAUC.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import onnx

from r2m.checkpoint import file_sha256
from r2m.config import ExportConfig
from r2m.data import balanced_sample, load_image
from r2m.errors import ExportError
from r2m.evaluation.metrics import auc
from r2m.export.metadata import META_PRECISION, META_QUANTIZATION, check_model, set_metadata
from r2m.fileio import atomic_write
from r2m.runtime.metadata import INPUT, OUTPUTS
from r2m.runtime.preprocess import Preprocessing
from r2m.runtime.session import import_onnxruntime, open_session

SCHEMES = ("static", "dynamic")
CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}  # -> ORT CalibrationMethod


def int8_path_for(fp32_path: Path | str) -> Path:
    """`model.onnx` -> `model.int8.onnx`."""
    path = Path(fp32_path)
    return path.with_name(f"{path.stem}.int8{path.suffix}")


@dataclass(frozen=True)
class Int8Recipe:
    """How to quantise: the scheme and, for `static`, ONNX Runtime's calibration options."""

    scheme: str = "static"
    calibration: str = "minmax"  # a key of CALIBRATION_METHODS
    activations: str = "uint8"  # uint8 (asymmetric) | int8 (symmetric)
    extra_options: tuple[tuple[str, object], ...] = ()  # quantize_static's extra_options, e.g. CalibMovingAverage
    float_convs: int = 0  # the first N Conv nodes stay float (static)

    @classmethod
    def from_config(cls, cfg: ExportConfig) -> Int8Recipe:
        return cls(cfg.int8_scheme, cfg.int8_calibration, float_convs=cfg.int8_float_convs)

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ExportError(f"int8 scheme '{self.scheme}': expected one of {', '.join(SCHEMES)} (export.int8_scheme)")
        if self.calibration not in CALIBRATION_METHODS:
            raise ExportError(f"int8 calibration '{self.calibration}': expected one of "
                              f"{', '.join(CALIBRATION_METHODS)} (export.int8_calibration)")
        if self.activations not in ("uint8", "int8"):
            raise ExportError(f"int8 activations '{self.activations}': expected uint8 or int8")

    def describe(self) -> dict:
        """What the int8 file's metadata (`r2m.quantization`) and the reports record."""
        if self.scheme == "dynamic":
            return {"scheme": "dynamic", "weights": "int8 per channel"}
        return {"scheme": "static", "format": "QDQ", "weights": "int8 per channel", "activations": self.activations,
                "calibration": self.calibration, "float_convs": self.float_convs,
                **({"options": dict(self.extra_options)} if self.extra_options else {})}


class CalibrationImages:
    """ONNX Runtime `CalibrationDataReader` over images: batches of preprocessed `pixel_values`.

    Every batch has `batch_size` images (the last one completed from the first images): ONNX
    Runtime's histogram calibrators (Entropy, Percentile) stack the batches' activations and need
    equal shapes. The images are decoded once."""

    def __init__(self, samples: Sequence, preprocess: Preprocessing, batch_size: int = 16):
        if not samples:
            raise ExportError("int8 calibration: no images to calibrate on")
        self.samples, self.preprocess = list(samples), preprocess
        self.batch_size = min(batch_size, len(self.samples))
        self._pixels: np.ndarray | None = None
        self._batches: Iterator[dict] | None = None

    def _iterate(self) -> Iterator[dict]:
        if self._pixels is None:
            self._pixels = np.stack([self.preprocess(load_image(s.path)) for s in self.samples])
        n = len(self._pixels)
        for i in range(0, n, self.batch_size):
            yield {INPUT: self._pixels[np.arange(i, i + self.batch_size) % n]}

    def get_next(self) -> dict | None:
        if self._batches is None:
            self._batches = self._iterate()
        return next(self._batches, None)

    def rewind(self) -> None:
        self._batches = None

    def __iter__(self) -> Iterator[dict]:  # as ONNX Runtime's CalibrationDataReader iterates
        self.rewind()
        return self._iterate()


def calibration_samples(datasets: Sequence, n: int, seed: int = 0) -> list:
    """Up to `n` validation images of the seen `datasets`, spread evenly over the tasks and half
    real, half fake in each (deterministic). Only the `val` splits: calibration is a choice made
    from data, so it never sees a test or unseen image."""
    seen = [d for d in datasets if d.is_seen]
    if not seen:
        return []
    per_task = max(2, n // len(seen))
    return [s for d in seen for s in balanced_sample(d.split("val"), per_task, seed)]


def float_nodes(model: onnx.ModelProto, first_convs: int = 0) -> list[str]:
    """Names of the nodes int8 quantisation must leave float (unnamed nodes are named first):

    - shape arithmetic: nodes none of whose inputs derives from the graph input's values, e.g. the
      TF-"same" padding of timm's `tf_` models, computed at run time from `Shape` (Cast, Div,
      Ceil, Sub, Clip, ...). Quantised, the computed pad amounts are rounded to an 8-bit grid and
      the padding goes wrong, which wrecks the scores;
    - the head: from the matrix product producing `logits` (a Gemm, or MatMul + Add) to the
      outputs, so the scores are not cut to 256 levels (ties that cost AUC, for a layer that costs
      nothing);
    - the first `first_convs` convolutions: the stem sees raw pixels, and 8-bit activations there
      cost the most (on the embedded default's champion: SQNR 8 dB after the first conv; with the
      first six float, the worst seen |ΔAUC| fell from 0.0129 to 0.0037 on validation).
    """
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"r2m_node_{i}"
    keep: list = []
    data = {i.name for i in model.graph.input}  # tensors computed from the input's values
    for node in model.graph.node:  # ONNX graphs are topologically sorted
        if node.op_type not in ("Shape", "Size") and any(i in data for i in node.input):
            data.update(node.output)
        else:
            keep.append(node)
    producer = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    if OUTPUTS[0] not in producer:
        raise ExportError(f"int8: no node produces the output '{OUTPUTS[0]}'")
    node = producer[OUTPUTS[0]]
    while True:  # back from logits to the head's Gemm/MatMul (a MatMul + Add is one Linear)
        keep.append(node)
        upstream = [producer[i] for i in node.input if i in producer and i in data]
        if node.op_type in ("Gemm", "MatMul") or len(upstream) != 1:
            break
        node = upstream[0]
    keep += [n for n in model.graph.node if n.op_type == "Conv"][:first_convs]
    frontier = [OUTPUTS[0]]
    while frontier:  # and forward from logits to every output
        for nxt in consumers.get(frontier.pop(), []):
            if nxt not in keep:
                keep.append(nxt)
                frontier.extend(nxt.output)
    return list(dict.fromkeys(n.name for n in keep))


def quantize_int8(fp32_path: Path | str, out: Path | str | None = None, recipe: Int8Recipe | None = None,
                  calibration: CalibrationImages | None = None) -> Path:
    """The int8 file of `recipe` (default: static MinMax) next to `fp32_path`; the r2m metadata is
    carried over with `r2m.precision = int8` and `r2m.quantization` = `recipe.describe()`. Static
    needs `calibration` images. Written atomically: `out` is absent or a complete, checked model."""
    recipe = recipe or Int8Recipe()
    if recipe.scheme == "static" and calibration is None:
        raise ExportError("int8 static quantisation needs calibration images (seen validation splits)")
    quantization = import_onnxruntime("onnxruntime.quantization")
    quant_pre_process = import_onnxruntime("onnxruntime.quantization.shape_inference").quant_pre_process
    fp32_path = Path(fp32_path)
    out = Path(out) if out else int8_path_for(fp32_path)
    source = onnx.load(str(fp32_path), load_external_data=False)

    def write(tmp: Path) -> None:
        # ORT's recommended pre-pass (shape inference + graph optimisation), then int8
        quant_pre_process(str(fp32_path), str(tmp), skip_symbolic_shape=False)
        prepared = onnx.load(str(tmp))
        keep_float = float_nodes(prepared, recipe.float_convs if recipe.scheme == "static" else 0)
        onnx.save(prepared, str(tmp))
        if recipe.scheme == "dynamic":
            quantization.quantize_dynamic(str(tmp), str(tmp), weight_type=quantization.QuantType.QInt8,
                                          per_channel=True, nodes_to_exclude=keep_float)
        else:
            calibration.rewind()
            activation = quantization.QuantType.QUInt8 if recipe.activations == "uint8" else quantization.QuantType.QInt8
            quantization.quantize_static(
                str(tmp), str(tmp), calibration, quant_format=quantization.QuantFormat.QDQ, per_channel=True,
                activation_type=activation, weight_type=quantization.QuantType.QInt8,
                calibrate_method=getattr(quantization.CalibrationMethod, CALIBRATION_METHODS[recipe.calibration]),
                nodes_to_exclude=keep_float,
                extra_options={"ActivationSymmetric": recipe.activations == "int8", **dict(recipe.extra_options)})
        model = onnx.load(str(tmp))
        set_metadata(model, {p.key: p.value for p in source.metadata_props})
        set_metadata(model, {META_PRECISION: "int8", META_QUANTIZATION: json.dumps(recipe.describe(), sort_keys=True)})
        onnx.save(model, str(tmp))
        check_model(tmp, out)

    try:
        with _quiet():
            atomic_write(out, write)
    except ExportError:
        raise
    except Exception as err:
        raise ExportError(f"{out}: int8 quantisation ({recipe.scheme}) failed: {type(err).__name__}: {err}") from None
    return out


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's quantisation tools print progress and log a warning per tensor they skip
    (e.g. the int64 pad amounts); none of it is ours to show in `r2m run`'s output."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def score_samples(session, samples: Sequence, preprocess, batch_size: int = 32) -> np.ndarray:
    """fake_probability of each sample's image under an ONNX Runtime session."""
    scores = []
    for i in range(0, len(samples), batch_size):
        x = np.stack([preprocess(load_image(s.path)) for s in samples[i : i + batch_size]])
        scores.append(session.run([OUTPUTS[1]], {INPUT: x})[0])
    return np.concatenate(scores) if scores else np.zeros(0, np.float32)


def int8_challenger(result, datasets: Sequence, cfg: ExportConfig, threads: int = 1) -> None:
    """Write the int8 file next to `result.onnx_path`; keep it only within tolerance on every seen task.

    Fills `result.int8_*` in place (an `ExportResult`): the recipe, each task's int8 and fp32 AUC
    on its test split, and the verdict with its reason.
    """
    recipe = Int8Recipe.from_config(cfg)
    result.int8_recipe = recipe.describe()
    seen = [d for d in datasets if d.is_seen]
    if not seen:
        result.int8_kept = False
        result.int8_reason = "no seen dataset given: int8 AUC cannot be checked against fp32, not written"
        return
    preprocess = Preprocessing.from_dict(result.preprocessing)
    calibration = None
    if recipe.scheme == "static":
        calibration = CalibrationImages(calibration_samples(seen, cfg.int8_calibration_samples), preprocess)
    path = quantize_int8(result.onnx_path, recipe=recipe, calibration=calibration)
    fp32 = open_session(result.onnx_path, threads, ["CPUExecutionProvider"])
    int8 = open_session(path, threads, ["CPUExecutionProvider"])
    worst = ("", 0.0)
    for ds in seen:
        samples = ds.split("test")
        labels = [s.label for s in samples]
        auc32 = auc(labels, score_samples(fp32, samples, preprocess), task=ds.name)
        auc8 = auc(labels, score_samples(int8, samples, preprocess), task=ds.name)
        result.int8_auc[ds.name], result.int8_fp32_auc[ds.name] = auc8, auc32
        if abs(auc8 - auc32) >= abs(worst[1]):
            worst = (ds.name, auc8 - auc32)
    task, delta = worst
    if abs(delta) > cfg.int8_auc_tolerance:
        path.unlink(missing_ok=True)
        result.int8_kept = False
        result.int8_reason = (f"int8 ({recipe.scheme}) AUC differs from fp32 by {delta:+.4f} on task '{task}' "
                              f"> export.int8_auc_tolerance = {cfg.int8_auc_tolerance:g}; deleted")
        return
    result.int8_path, result.int8_sha256, result.int8_kept = path, file_sha256(path), True
    result.int8_reason = (f"int8 ({recipe.scheme}) worst |ΔAUC| {abs(delta):.4f} (task '{task}') "
                          f"<= {cfg.int8_auc_tolerance:g}")


__all__ = ["CALIBRATION_METHODS", "SCHEMES", "CalibrationImages", "Int8Recipe", "calibration_samples", "float_nodes",
           "int8_challenger", "int8_path_for", "quantize_int8", "score_samples"]
