"""The ONNX Runtime HTTP server as a real process on loopback (issue 6)."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import torch
import yaml
from PIL import Image

from r2m.checkpoint import save_checkpoint
from r2m.config import ModelConfig, load_params
from r2m.data.transforms import to_pixel_array
from r2m.export.metadata import INPUT, OUTPUTS
from r2m.export.onnx_export import export_checkpoint
from r2m.export.publish import MODEL_NAME, point_serving, publish
from r2m.models import build_detector, load_detector
from r2m.serving.model_store import ModelStore, open_session

MAX_UPLOAD = 1_000_000
MAX_PIXELS = 1_000_000


def _export(root: Path, seed: int, bias: float, params) -> Path:
    torch.manual_seed(seed)
    detector = build_detector(ModelConfig(name="r2m-tiny"))
    with torch.no_grad():
        detector.head.bias.copy_(torch.tensor([0.0, bias]))  # v1 and v2 answer visibly differently
    ckpt = root / f"merged-{seed}.safetensors"
    save_checkpoint(ckpt, detector.checkpoint_tensors(), {"kind": "merged", "model": {"name": "r2m-tiny"},
                                                         "generators": ["fs-a"]})
    return export_checkpoint(ckpt, root / f"model-{seed}.onnx", params, int8=False).onnx_path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`r2m serve` in a subprocess on a free loopback port, serving version 1."""
    root = tmp_path_factory.mktemp("serve")
    settings = {"serve": {"poll_interval_s": 0.2, "max_upload_bytes": MAX_UPLOAD, "threads": 1},
                "data": {"max_image_pixels": MAX_PIXELS}, "export": {"exporter": "torchscript"}}
    (root / "params.yaml").write_text(yaml.safe_dump(settings))
    params = load_params(root=root)
    models = {1: _export(root, 0, -2.0, params), 2: _export(root, 1, 2.0, params)}
    repo = root / "repo"
    publish(models[1], repo, params.export)
    port = _free_port()
    env = {**os.environ, "R2M_PROJECT_ROOT": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "r2m.cli", "serve", "--repository", str(repo), "--port", str(port)],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    deadline = time.monotonic() + 90
    while True:
        try:
            if client.get("/healthz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server did not start: {proc.stdout.read()}")
        time.sleep(0.2)
    yield {"proc": proc, "client": client, "repo": repo, "root": root, "models": models, "params": params,
           "port": port}
    client.close()
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def _image_bytes(fmt: str, seed: int = 0, size=(80, 96)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _expected(onnx_path: Path, data: bytes) -> float:
    x = to_pixel_array(Image.open(io.BytesIO(data)).convert("RGB"), 64, (0.5,) * 3, (0.5,) * 3)
    return float(open_session(onnx_path).run([OUTPUTS[1]], {INPUT: x[None]})[0][0])


def test_binds_loopback_and_reports_health(server):
    conns = psutil.Process(server["proc"].pid).net_connections(kind="inet")
    listening = [c.laddr for c in conns if c.status == psutil.CONN_LISTEN]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening)
    health = server["client"].get("/healthz").json()
    assert health == {"status": "ok", "model_name": MODEL_NAME, "model_version": 1}


def test_detect_scores_png_and_jpeg_like_the_model(server):
    detector = load_detector(server["root"] / "merged-0.safetensors")
    for fmt, mime in (("PNG", "image/png"), ("JPEG", "image/jpeg")):
        data = _image_bytes(fmt)
        res = server["client"].post("/v1/detect", files={"file": (f"face.{fmt.lower()}", data, mime)})
        assert res.status_code == 200, res.text
        body = res.json()
        assert body["model_version"] == 1
        assert body["fake_probability"] == pytest.approx(_expected(server["models"][1], data), abs=1e-6)
        x = torch.from_numpy(to_pixel_array(Image.open(io.BytesIO(data)).convert("RGB"), 64, (0.5,) * 3, (0.5,) * 3))
        with torch.no_grad():
            torch_p = torch.softmax(detector(x[None]), -1)[0, 1].item()
        assert body["fake_probability"] == pytest.approx(torch_p, abs=1e-4)
        assert body["label"] == ("fake" if body["fake_probability"] >= 0.5 else "real")


def test_open_inference_protocol(server):
    client = server["client"]
    meta = client.get(f"/v2/models/{MODEL_NAME}").json()
    assert meta["inputs"] == [{"name": INPUT, "datatype": "FP32", "shape": [-1, 3, 64, 64]}]
    assert [o["name"] for o in meta["outputs"]] == list(OUTPUTS)
    assert meta["parameters"]["preprocessing"]["image_size"] == 64
    x = np.random.default_rng(1).uniform(-1, 1, size=(2, 3, 64, 64)).astype(np.float32)
    req = {"id": "r1", "inputs": [{"name": INPUT, "shape": [2, 3, 64, 64], "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}
    res = client.post(f"/v2/models/{MODEL_NAME}/infer", json=req)
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["id"] == "r1" and body["model_name"] == MODEL_NAME and body["model_version"] == "1"
    logits, prob = open_session(server["models"][1]).run(None, {INPUT: x})
    out = {o["name"]: o for o in body["outputs"]}
    assert out["logits"]["shape"] == [2, 2] and out["fake_probability"]["shape"] == [2]
    np.testing.assert_allclose(out["logits"]["data"], logits.ravel(), atol=1e-5)
    np.testing.assert_allclose(out["fake_probability"]["data"], prob, atol=1e-6)
    only = client.post(f"/v2/models/{MODEL_NAME}/infer", json={**req, "outputs": [{"name": "fake_probability"}]})
    assert [o["name"] for o in only.json()["outputs"]] == ["fake_probability"]
    assert client.get("/v2/health/ready").json() == {"ready": True}


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (2000, 2000)).save(buf, format="PNG")  # 4 Mpx > 1 Mpx limit, a few KB on disk
    return buf.getvalue()


def test_bad_input_gets_4xx_with_reason_and_server_keeps_serving(server):
    client, infer = server["client"], f"/v2/models/{MODEL_NAME}/infer"
    png = _image_bytes("PNG")
    cases = [
        ({"files": {"file": ("x.png", b"this is not an image", "image/png")}}, 400, "not an image"),
        ({"files": {"file": ("x.png", png[: len(png) // 2], "image/png")}}, 400, "truncated"),
        ({"files": {"file": ("bomb.png", _bomb(), "image/png")}}, 413, "decompression bomb"),
        ({"files": {"file": ("big.png", b"\x89PNG" + bytes(MAX_UPLOAD + 10), "image/png")}}, 413, "max_upload_bytes"),
        ({"files": {"file": ("x.txt", png, "text/plain")}}, 415, "content type"),
        ({"content": png, "headers": {"content-type": "image/png"}}, 415, "multipart/form-data"),
        ({"files": {"other": ("x.png", png, "image/png")}}, 422, "'file'"),
    ]
    for kwargs, status, reason in cases:
        res = client.post("/v1/detect", **kwargs)
        assert res.status_code == status, (reason, res.text)
        assert reason in res.json()["detail"]
    bad_infer = [
        (b"{not json", "not JSON"),
        (b'{"inputs": [{"name": "x", "shape": [1,3,64,64], "datatype": "FP32", "data": []}]}', "named"),
        (b'{"inputs": [{"name": "pixel_values", "shape": [1,3,32,32], "datatype": "FP32", "data": []}]}', "shape"),
        (b'{"inputs": [{"name": "pixel_values", "shape": [1,3,64,64], "datatype": "INT8", "data": []}]}', "FP32"),
        (b'{"inputs": [{"name": "pixel_values", "shape": [1,3,64,64], "datatype": "FP32", "data": [1, 2]}]}',
         "values"),
    ]
    for body, reason in bad_infer:
        res = client.post(infer, content=body, headers={"content-type": "application/json"})
        assert res.status_code == 400 and reason in res.json()["detail"], res.text
    assert client.post(infer, content=b"[" + b"0," * MAX_UPLOAD + b"0]").status_code == 413
    ok = client.post("/v1/detect", files={"file": ("face.png", png, "image/png")})
    assert ok.status_code == 200 and server["proc"].poll() is None


def test_broken_version_is_skipped_in_process(server, tmp_path):
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(server["repo"], repo)
    broken = repo / MODEL_NAME / "5"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"not an onnx model")
    point_serving(repo, 5)  # config.pbtxt names the broken version
    store = ModelStore(repo)
    assert store.refresh().version == 1 and 5 in store.failed  # nothing served yet: the next one that loads
    assert store.refresh().version == 1  # and a served version is kept while the named one fails


def test_hot_reload_switches_version_without_failing_requests(server):
    """Clients hammer /v1/detect while version 2 is published; answers move to v2, none fail."""
    port, png = server["port"], _image_bytes("PNG", seed=3)
    expected = {v: _expected(server["models"][v], png) for v in (1, 2)}
    assert abs(expected[1] - expected[2]) > 0.1
    seen: list[tuple[int, int, float]] = []
    stop = threading.Event()

    def client_loop() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            while not stop.is_set():
                try:
                    res = client.post("/v1/detect", files={"file": ("f.png", png, "image/png")})
                    body = res.json()
                    seen.append((res.status_code, body.get("model_version", -1), body.get("fake_probability", -1)))
                except httpx.HTTPError as err:  # a dropped connection is a failed request too
                    seen.append((599, -1, repr(err)))

    threads = [threading.Thread(target=client_loop) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    published = publish(server["models"][2], server["repo"], server["params"].export)
    assert published.version == 2
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(v == 2 for _, v, _ in seen[-4:]):
        time.sleep(0.1)
    time.sleep(0.5)  # a few more requests on v2
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert seen and all(status == 200 for status, _, _ in seen), [s for s in seen if s[0] != 200][:3]
    versions = [v for _, v, _ in seen]
    assert versions[-1] == 2 and versions.count(1) > 0  # served v1, then switched to v2
    first_v2 = versions.index(2)
    assert all(v == 2 for v in versions[first_v2 + 4 :])  # once switched, it stays switched (4 in flight)
    for _, v, p in seen:
        assert p == pytest.approx(expected[v], abs=1e-6)  # each answer from the version it names
    assert server["client"].get("/healthz").json()["model_version"] == 2
    assert server["proc"].poll() is None  # same process: no restart


def test_empty_repository_answers_503_until_a_first_publish(server, tmp_path):
    from fastapi.testclient import TestClient

    from r2m.serving.app import create_app

    repo = tmp_path / "repo"
    repo.mkdir()
    app = create_app(repo, server["params"].serve, poll=False)
    png = _image_bytes("PNG")
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 503
        assert client.get("/v2/health/ready").status_code == 503
        res = client.post("/v1/detect", files={"file": ("f.png", png, "image/png")})
        assert res.status_code == 503 and "no model published" in res.json()["detail"]
        publish(server["models"][2], repo, server["params"].export)
        app.state.store.refresh()  # what the poller does every serve.poll_interval_s
        res = client.post("/v1/detect", files={"file": ("f.png", png, "image/png")})
        assert res.status_code == 200 and res.json()["model_version"] == 1
        assert res.json()["fake_probability"] == pytest.approx(_expected(server["models"][2], png), abs=1e-6)
