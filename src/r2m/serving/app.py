"""The HTTP server: FastAPI over ONNX Runtime (deploy/README.md).

```
GET  /healthz                            200 {"status": "ok", "model_version"} | 503 without a model
POST /v1/detect                          multipart `file` -> {"fake_probability", "label", "model_version"}
GET  /v2/health/live, /v2/health/ready   Open Inference Protocol health
GET  /v2/models/r2m_detector             OIP model metadata (+ preprocessing and lineage)
GET  /v2/models/r2m_detector/ready
GET  /v2/models/r2m_detector/stats       Triton's statistics extension: session calls per version and batch size
POST /v2/models/r2m_detector/infer       OIP JSON tensors in, tensors out (what Triton/KServe answer)
```
Concurrent requests are scored in shared session calls as the served version's config.pbtxt
says (`r2m.serving.batching`); each answer names the version that scored it.

Request bodies are read under three limits before anything is parsed: a declared
`Content-Length` over the limit is answered 413 at once, unread, and the connection closed; a
body that grows past the limit while streaming likewise; a body that arrives too slowly (no byte
for `serve.body_timeout_s`, or, after that grace, slower on average than
`serve.min_body_bytes_per_s`) is answered 408 and the connection closed, so slow clients cannot
hold the server. Uploads are then checked before any pixel is decoded: request and part content
types, the size (`serve.max_upload_bytes`), then strict decoding (`r2m.data.decode_image`:
truncated files, non-images, formats outside `data.extensions`, decompression bombs over
`data.max_image_pixels`: the same checks as dataset validation). Bad input gets a 4xx with
`{"detail": reason}`; nothing a client sends stops the server.
"""

from __future__ import annotations

import asyncio
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
from starlette.requests import ClientDisconnect

from r2m.config import DataConfig, ServeConfig
from r2m.data.images import decode_image  # PIL only: r2m.data imports no torch
from r2m.errors import DatasetError
from r2m.runtime.repository import MODEL_NAME, list_versions
from r2m.serving.batching import Batcher, BatchStats, run_session
from r2m.serving.model_store import LoadedModel, ModelStore

log = logging.getLogger("r2m.serving")

ACCEPTED_TYPES = ("image/", "application/octet-stream")  # octet-stream: let the decoder decide
MULTIPART_OVERHEAD = 16 * 1024  # boundaries and part headers around the file
CLOSE = {"Connection": "close"}  # uvicorn closes the connection once this response is sent


def _too_large(cfg: ServeConfig) -> HTTPException:
    return HTTPException(413, f"upload larger than serve.max_upload_bytes = {cfg.max_upload_bytes} bytes", CLOSE)


def _too_slow(cfg: ServeConfig, received: int, seconds: float) -> HTTPException:
    return HTTPException(408, f"request body too slow: {received} bytes in {seconds:.1f} s (serve.body_timeout_s = "
                              f"{cfg.body_timeout_s:g}, serve.min_body_bytes_per_s = {cfg.min_body_bytes_per_s})",
                         CLOSE)


async def body_chunks(request: Request, limit: int, cfg: ServeConfig) -> AsyncIterator[bytes]:
    """The request body as it arrives, at most `limit` bytes (declared or streamed: 413 at once),
    each chunk within the time `serve.body_timeout_s` / `serve.min_body_bytes_per_s` allow (408)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(cfg)  # unread: nothing of a body that will be refused is waited for
    loop = asyncio.get_running_loop()
    start = last = loop.time()
    received = 0
    while True:
        deadline = last + cfg.body_timeout_s  # no byte for that long: dropped
        if cfg.min_body_bytes_per_s:  # after the grace, the average rate must hold
            deadline = min(deadline, start + cfg.body_timeout_s + received / cfg.min_body_bytes_per_s)
        try:
            message = await asyncio.wait_for(request.receive(), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            raise _too_slow(cfg, received, loop.time() - start) from None
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        if chunk:
            received += len(chunk)
            last = loop.time()
            if received > limit:
                raise _too_large(cfg)
            yield chunk
        if not message.get("more_body", False):
            return


async def read_body(request: Request, cfg: ServeConfig) -> bytes:
    """The whole body (JSON routes), within `serve.max_upload_bytes` and the body timeouts."""
    return b"".join([chunk async for chunk in body_chunks(request, cfg.max_upload_bytes, cfg)])


async def read_upload(request: Request, cfg: ServeConfig, formats: tuple[str, ...]) -> tuple[bytes, str, str]:
    """(bytes, filename, content type) of the multipart field `file`, every check but decoding."""
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise HTTPException(415, f"expected multipart/form-data with a field 'file', got content type '{ctype or 'none'}'")
    body = body_chunks(request, cfg.max_upload_bytes + MULTIPART_OVERHEAD, cfg)
    parser = MultiPartParser(request.headers, body, max_files=1, max_fields=8)
    try:
        form = await parser.parse()
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
    if len(data) > cfg.max_upload_bytes:
        raise _too_large(cfg)
    return data, upload.filename or "file", part_type


def _require(store: ModelStore) -> LoadedModel:
    model = store.current
    if model is None:
        raise HTTPException(503, f"no model published in {store.repository / store.name} yet")
    return model


def _image_rows(model: LoadedModel, data: bytes, filename: str, data_cfg: DataConfig) -> np.ndarray:
    """Decode one upload and prepare it as `model`'s metadata says: float32 [1, 3, H, W]."""
    try:
        image = decode_image(data, filename, data_cfg.max_image_pixels, data_cfg.formats)
    except DatasetError as err:
        status = 413 if "decompression bomb" in err.reason else 415 if "not accepted" in err.reason else 400
        raise HTTPException(status, err.reason) from None
    return model.preprocess(image)[None]


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


def _infer_answer(model: LoadedModel, wanted: list[str], values: dict[str, np.ndarray], request_id) -> dict:
    outputs = [{"name": n, "datatype": "FP32", "shape": list(values[n].shape), "data": values[n].ravel().tolist()}
               for n in wanted]
    answer = {"model_name": model.name, "model_version": str(model.version), "outputs": outputs}
    if request_id is not None:
        answer["id"] = request_id
    return answer


def model_metadata(model: LoadedModel, store: ModelStore) -> dict:
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
    stats = BatchStats()
    batcher = Batcher(stats)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await run_in_threadpool(store.refresh)
        if store.current is None:
            log.warning("no model in %s yet; polling every %.1fs", store.repository / name, cfg.poll_interval_s)
        if poll:
            store.start_polling(cfg.poll_interval_s)
        batcher.start()
        yield
        store.stop_polling()
        batcher.stop()

    async def scored(model: LoadedModel, x: np.ndarray) -> dict[str, np.ndarray]:
        """Every output of `model` for rows `x`: through the batcher when the version batches,
        else one session call of its own in the thread pool."""
        if model.batching.batching:
            values = await asyncio.wrap_future(batcher.submit(model, x))
        else:
            values = await run_in_threadpool(run_session, model, x, stats)
        return dict(zip(model.output_names, values))

    app = FastAPI(title="r2m deepfake detector", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.store, app.state.batcher = store, batcher

    @app.get("/healthz")
    def healthz():
        model = store.current
        if model is None:
            return JSONResponse({"status": "unavailable", "detail": f"no model in {store.repository / name}"}, 503)
        return {"status": "ok", "model_name": name, "model_version": model.version}

    @app.post("/v1/detect")
    async def detect(request: Request):
        """One image (multipart field `file`) -> P(fake), label, and the version that answered."""
        upload, filename, _ = await read_upload(request, cfg, data.formats)
        model = _require(store)  # read once: this request finishes on this version
        x = await run_in_threadpool(_image_rows, model, upload, filename, data)
        p = float((await scored(model, x))["fake_probability"][0])
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

    @app.get(f"/v2/models/{name}/stats")
    def model_stats():
        """Triton's statistics extension: per version, session calls per batch size."""
        return {"model_stats": stats.model_stats(name)}

    @app.post(f"/v2/models/{name}/infer")
    async def infer(request: Request):
        """Open Inference Protocol: {"inputs": [{"name", "shape", "datatype": "FP32", "data"}]}."""
        body = await read_body(request, cfg)
        model = _require(store)
        x, wanted, request_id = await run_in_threadpool(_parse_infer_request, model, body)
        return _infer_answer(model, wanted, await scored(model, x), request_id)

    return app
