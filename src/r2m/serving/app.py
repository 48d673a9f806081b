"""The HTTP server: FastAPI over ONNX Runtime (SPEC section 8).

```
GET  /healthz                            200 {"status": "ok", "model_version"} | 503 without a model
POST /v1/detect                          multipart `file` -> {"fake_probability", "label", "model_version"}
GET  /v2/health/live, /v2/health/ready   Open Inference Protocol health
GET  /v2/models/r2m_detector             OIP model metadata (+ preprocessing and lineage)
GET  /v2/models/r2m_detector/ready
POST /v2/models/r2m_detector/infer       OIP JSON tensors in, tensors out (what Triton/KServe answer)
```
Uploads are checked before any pixel is decoded: request and part content types, the size
(`serve.max_upload_bytes`, enforced while streaming), then strict decoding (`r2m.data.decode_image`:
truncated files, non-images, formats outside `data.extensions`, decompression bombs over
`data.max_image_pixels`: the same checks as dataset validation). Bad input gets a
4xx with `{"detail": reason}`; nothing a client sends stops the server.
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from r2m.config import DataConfig, ServeConfig
from r2m.data.images import decode_image  # (imports r2m.data, hence torch: paid at start-up)
from r2m.errors import DatasetError
from r2m.export.metadata import OUTPUTS
from r2m.export.publish import MODEL_NAME
from r2m.serving.model_store import LoadedModel, ModelStore

log = logging.getLogger("r2m.serving")

ACCEPTED_TYPES = ("image/", "application/octet-stream")  # octet-stream: let the decoder decide
MULTIPART_OVERHEAD = 16 * 1024  # boundaries and part headers around the file
DRAIN_FACTOR = 8  # read (and drop) up to this × the limit so the client gets its 413 cleanly


class BodyTooLarge(Exception):
    pass


async def _limited_stream(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The request body, raising `BodyTooLarge` once more than `limit` bytes arrived."""
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            raise BodyTooLarge
        yield chunk


async def _drain(request: Request, limit: int) -> None:
    seen = 0
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > DRAIN_FACTOR * limit:
                return
    except Exception:  # the client went away: nothing left to answer
        return


def _too_large(limit: int) -> HTTPException:
    return HTTPException(413, f"upload larger than serve.max_upload_bytes = {limit} bytes")


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body (JSON routes), 413 beyond `limit` (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        await _drain(request, limit)
        raise _too_large(limit)
    body = bytearray()
    try:
        async for chunk in _limited_stream(request, limit):
            body += chunk
    except BodyTooLarge:
        await _drain(request, limit)
        raise _too_large(limit) from None
    return bytes(body)


async def read_upload(request: Request, limit: int, formats: tuple[str, ...]) -> tuple[bytes, str, str]:
    """(bytes, filename, content type) of the multipart field `file`, every check but decoding."""
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise HTTPException(415, f"expected multipart/form-data with a field 'file', got content type '{ctype or 'none'}'")
    body_limit = limit + MULTIPART_OVERHEAD
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > body_limit:
        await _drain(request, limit)
        raise _too_large(limit)
    parser = MultiPartParser(request.headers, _limited_stream(request, body_limit), max_files=1, max_fields=8)
    try:
        form = await parser.parse()
    except BodyTooLarge:
        await _drain(request, limit)
        raise _too_large(limit) from None
    except MultiPartException as err:
        raise HTTPException(400, f"malformed multipart body: {err.message}") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise HTTPException(422, "multipart field 'file' (one image) is missing")
        part_type = (upload.content_type or "application/octet-stream").lower()
        if not part_type.startswith(ACCEPTED_TYPES):
            raise HTTPException(415, f"field 'file' has content type '{part_type}'; expected image/* "
                                     f"({', '.join(f.lower() for f in formats)})")
        data = await upload.read()
    finally:
        await form.close()
    if len(data) > limit:
        raise _too_large(limit)
    return data, upload.filename or "file", part_type


def _require(store: ModelStore) -> LoadedModel:
    model = store.current
    if model is None:
        raise HTTPException(503, f"no model published in {store.repository / store.name} yet")
    return model


def _score_image(model: LoadedModel, data: bytes, filename: str, data_cfg: DataConfig) -> float:
    try:
        image = decode_image(data, filename, data_cfg.max_image_pixels, data_cfg.formats)
    except DatasetError as err:
        status = 413 if "decompression bomb" in err.reason else 415 if "not accepted" in err.reason else 400
        raise HTTPException(status, err.reason) from None
    x = model.preprocess(image)[None]
    return float(model.session.run([OUTPUTS[1]], {model.input_name: x})[0][0])


def _parse_infer_request(model: LoadedModel, body: bytes) -> tuple[np.ndarray, list[str], str | None]:
    """OIP request -> (pixel_values, requested outputs, id); 400 with the reason otherwise."""
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HTTPException(400, f"body is not JSON: {err}") from None
    except RecursionError:  # the parser recurses once per nesting level
        raise HTTPException(400, "body is JSON nested too deeply") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list) or len(request["inputs"]) != 1:
        raise HTTPException(400, f"expected {{'inputs': [one tensor named '{model.input_name}']}}")
    tensor = request["inputs"][0]
    if not isinstance(tensor, dict) or tensor.get("name") != model.input_name:
        raise HTTPException(400, f"input must be named '{model.input_name}'")
    if tensor.get("datatype") != "FP32":
        raise HTTPException(400, f"input '{model.input_name}' datatype must be FP32, got {tensor.get('datatype')!r}")
    shape, expected = tensor.get("shape"), model.inputs[0]["shape"]
    if (not isinstance(shape, list) or len(shape) != len(expected)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
            or any(e != -1 and d != e for d, e in zip(shape, expected))):
        raise HTTPException(400, f"input shape must be {expected} (-1 = any batch), got {shape}")
    try:
        x = np.asarray(tensor.get("data"), dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise HTTPException(400, f"input data is not a list of numbers: {err}") from None
    if x.size != math.prod(shape):
        raise HTTPException(400, f"input data has {x.size} values, shape {shape} needs {math.prod(shape)}")
    if not np.isfinite(x).all():
        raise HTTPException(400, "input data holds NaN or infinity")
    known = [o["name"] for o in model.outputs]
    requested = request.get("outputs")
    if requested is not None and not (isinstance(requested, list) and all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in requested)):
        raise HTTPException(400, f"'outputs' must be a list of {{'name': ...}} (outputs: {', '.join(known)})")
    wanted = [o["name"] for o in requested or []] or known
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise HTTPException(400, f"unknown output '{unknown[0]}' (outputs: {', '.join(known)})")
    return x.reshape(shape), wanted, request.get("id")


def _infer(model: LoadedModel, body: bytes) -> dict:
    x, wanted, request_id = _parse_infer_request(model, body)
    values = model.session.run(wanted, {model.input_name: x})
    outputs = [{"name": n, "datatype": "FP32", "shape": list(v.shape), "data": v.ravel().tolist()}
               for n, v in zip(wanted, values)]
    answer = {"model_name": model.name, "model_version": str(model.version), "outputs": outputs}
    if request_id is not None:
        answer["id"] = request_id
    return answer


def model_metadata(model: LoadedModel, store: ModelStore) -> dict:
    from r2m.export.publish import list_versions

    return {
        "name": model.name,
        "versions": [str(v) for v in list_versions(store.repository, store.name)],
        "platform": "onnxruntime_onnx",
        "inputs": model.inputs,
        "outputs": model.outputs,
        "parameters": {"model_version": str(model.version), **model.metadata},
    }


def create_app(repository: Path | str, cfg: ServeConfig | None = None, data: DataConfig | None = None,
               name: str = MODEL_NAME, poll: bool = True) -> FastAPI:
    """The server for `<repository>/<name>/<version>/model.onnx` (newest version, hot reloaded).

    `data` (params.yaml `data:`) sets what an upload may be: the formats of `data.extensions`
    and at most `data.max_image_pixels`, exactly as dataset validation checks them."""
    cfg = cfg or ServeConfig()
    data = data or DataConfig()
    store = ModelStore(repository, cfg.threads, name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await run_in_threadpool(store.refresh)
        if store.current is None:
            log.warning("no model in %s yet; polling every %.1fs", store.repository / name, cfg.poll_interval_s)
        if poll:
            store.start_polling(cfg.poll_interval_s)
        yield
        store.stop_polling()

    app = FastAPI(title="r2m deepfake detector", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.store = store

    @app.get("/healthz")
    def healthz():
        model = store.current
        if model is None:
            return JSONResponse({"status": "unavailable", "detail": f"no model in {store.repository / name}"}, 503)
        return {"status": "ok", "model_name": name, "model_version": model.version}

    @app.post("/v1/detect")
    async def detect(request: Request):
        """One image (multipart field `file`) -> P(fake), label, and the version that answered."""
        upload, filename, _ = await read_upload(request, cfg.max_upload_bytes, data.formats)
        model = _require(store)  # read once: this request finishes on this version
        p = await run_in_threadpool(_score_image, model, upload, filename, data)
        return {"fake_probability": p, "label": "fake" if p >= cfg.threshold else "real",
                "model_version": model.version}

    @app.get("/v2/health/live")
    def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    def ready():
        return JSONResponse({"ready": store.current is not None}, 200 if store.current is not None else 503)

    @app.get(f"/v2/models/{name}")
    def metadata():
        return model_metadata(_require(store), store)

    @app.get(f"/v2/models/{name}/ready")
    def model_ready():
        return ready()

    @app.post(f"/v2/models/{name}/infer")
    async def infer(request: Request):
        """Open Inference Protocol: {"inputs": [{"name", "shape", "datatype": "FP32", "data"}]}."""
        body = await read_body(request, cfg.max_upload_bytes)
        model = _require(store)
        return await run_in_threadpool(_infer, model, body)

    return app
