"""The int8 challenger: ONNX Runtime dynamic quantisation of the fp32 export (SPEC section 8).

Weights of MatMul/Gemm become int8 (per channel), activations are quantised on the fly, so no
calibration data is needed. The int8 file is kept only when its AUC stays within
`export.int8_auc_tolerance` of the fp32 file's AUC on the test split of every seen task; else
it is deleted and the reason recorded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from r2m.checkpoint import file_sha256
from r2m.config import ExportConfig
from r2m.errors import ExportError


def int8_path_for(fp32_path: Path | str) -> Path:
    """`model.onnx` -> `model.int8.onnx`."""
    path = Path(fp32_path)
    return path.with_name(f"{path.stem}.int8{path.suffix}")


def quantize_int8(fp32_path: Path | str, out: Path | str | None = None) -> Path:
    """Dynamic int8 quantisation; the r2m metadata is carried over with `r2m.precision = int8`."""
    from r2m.export.runtime import import_onnxruntime

    quantization = import_onnxruntime("onnxruntime.quantization")
    QuantType, quantize_dynamic = quantization.QuantType, quantization.quantize_dynamic
    quant_pre_process = import_onnxruntime("onnxruntime.quantization.shape_inference").quant_pre_process

    from r2m.export.metadata import META_PRECISION, check_model, set_metadata
    from r2m.export.onnx_export import _atomic_target

    fp32_path = Path(fp32_path)
    out = Path(out) if out else int8_path_for(fp32_path)
    tmp = _atomic_target(out)
    try:
        # ORT's recommended pre-pass (shape inference + graph optimisation), then int8 weights
        quant_pre_process(str(fp32_path), str(tmp), skip_symbolic_shape=False)
        quantize_dynamic(str(tmp), str(tmp), weight_type=QuantType.QInt8, per_channel=True)
        source = onnx.load(str(fp32_path), load_external_data=False)
        model = onnx.load(str(tmp))
        set_metadata(model, {p.key: p.value for p in source.metadata_props})
        set_metadata(model, {META_PRECISION: "int8"})
        onnx.save(model, str(tmp))
        check_model(tmp)
        os.replace(tmp, out)
    except ExportError:
        raise
    except Exception as err:
        raise ExportError(f"{out}: int8 quantisation failed: {type(err).__name__}: {err}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return out


def score_samples(session, samples: Sequence, preprocess, batch_size: int = 32) -> np.ndarray:
    """fake_probability of each sample's image under an ONNX Runtime session."""
    from r2m.data import load_image
    from r2m.export.metadata import INPUT, OUTPUTS

    scores = []
    for i in range(0, len(samples), batch_size):
        x = np.stack([preprocess(load_image(s.path)) for s in samples[i : i + batch_size]])
        scores.append(session.run([OUTPUTS[1]], {INPUT: x})[0])
    return np.concatenate(scores) if scores else np.zeros(0, np.float32)


def int8_challenger(result, datasets: Sequence, cfg: ExportConfig, threads: int = 1) -> None:
    """Write the int8 file next to `result.onnx_path`; keep it only within tolerance on every task.

    Fills `result.int8_*` in place (an `ExportResult`).
    """
    from r2m.export.onnx_export import _auc
    from r2m.serving.model_store import open_session
    from r2m.serving.preprocess import Preprocessing

    if not datasets:
        result.int8_kept = False
        result.int8_reason = "no seen dataset given: int8 AUC cannot be checked against fp32, not written"
        return
    path = quantize_int8(result.onnx_path)
    preprocess = Preprocessing.from_dict(result.preprocessing)
    fp32 = open_session(result.onnx_path, threads, ["CPUExecutionProvider"])
    int8 = open_session(path, threads, ["CPUExecutionProvider"])
    worst = ("", 0.0)
    for ds in datasets:
        samples = ds.split("test")
        labels = np.array([s.label for s in samples])
        if len(set(labels.tolist())) < 2:
            raise ExportError(f"int8 check: task '{ds.name}' test split has one class only")
        auc32 = _auc(labels, score_samples(fp32, samples, preprocess))
        auc8 = _auc(labels, score_samples(int8, samples, preprocess))
        result.int8_auc[ds.name] = auc8
        if abs(auc8 - auc32) >= abs(worst[1]):
            worst = (ds.name, auc8 - auc32)
    task, delta = worst
    if abs(delta) > cfg.int8_auc_tolerance:
        path.unlink(missing_ok=True)
        result.int8_kept = False
        result.int8_reason = (f"int8 AUC differs from fp32 by {delta:+.4f} on task '{task}' "
                              f"> export.int8_auc_tolerance = {cfg.int8_auc_tolerance:g}; deleted")
        return
    result.int8_path, result.int8_sha256, result.int8_kept = path, file_sha256(path), True
    result.int8_reason = f"worst |ΔAUC| {abs(delta):.4f} (task '{task}') <= {cfg.int8_auc_tolerance:g}"
