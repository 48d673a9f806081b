"""The ONNX Runtime HTTP server as a real process on loopback: scoring, the Open Inference
Protocol, bad input, hot reload, batching of concurrent requests, the request body's limits
(raw sockets) and the torch-free server path (deploy/README.md)."""

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
from r2m.data.pixels import to_pixel_array
from r2m.export.onnx_export import export_checkpoint
from r2m.export.publish import MODEL_NAME, point_serving, publish
from r2m.models import build_detector, load_detector
from r2m.runtime.metadata import INPUT, OUTPUTS
from r2m.runtime.session import open_session
from r2m.serving.model_store import ModelStore
from r2m.threads import usable_cpus

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


def _start_server(root: Path, repo: Path) -> tuple[subprocess.Popen, httpx.Client, int]:
    """`r2m serve` of `repo` in a subprocess on a free loopback port (root's params.yaml), once healthy."""
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
                return proc, client, port
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server did not start: {proc.stdout.read()}")
        time.sleep(0.2)


def _stop_server(proc: subprocess.Popen, client: httpx.Client) -> None:
    client.close()
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


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
    proc, client, port = _start_server(root, repo)
    yield {"proc": proc, "client": client, "repo": repo, "root": root, "models": models, "params": params,
           "port": port}
    _stop_server(proc, client)


BODY_TIMEOUT_S = 1.0
MIN_BODY_RATE = 1000  # bytes per second
QUEUE_DELAY_US = 300_000  # long enough that concurrent requests surely meet in the queue


@pytest.fixture(scope="module")
def strict_server(server, tmp_path_factory):
    """A second server: a long batching queue delay in its config.pbtxt and a short body timeout."""
    root = tmp_path_factory.mktemp("serve-strict")
    settings = {"serve": {"poll_interval_s": 0.2, "max_upload_bytes": MAX_UPLOAD, "threads": 1,
                          "body_timeout_s": BODY_TIMEOUT_S, "min_body_bytes_per_s": MIN_BODY_RATE},
                "export": {"exporter": "torchscript", "triton_max_batch_size": 8,
                           "triton_max_queue_delay_us": QUEUE_DELAY_US}}
    (root / "params.yaml").write_text(yaml.safe_dump(settings))
    params = load_params(root=root)
    repo = root / "repo"
    publish(server["models"][1], repo, params.export)
    proc, client, port = _start_server(root, repo)
    yield {"proc": proc, "client": client, "port": port, "model": server["models"][1]}
    _stop_server(proc, client)


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


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(strict_server):
    """16 clients at once: 16 answers, each the score of its own image alone, from fewer session
    calls than requests (the server's own statistics), none larger than max_batch_size."""
    port, n = strict_server["port"], 16
    images = [_image_bytes("PNG", seed=100 + i) for i in range(n)]
    alone = [_expected(strict_server["model"], data) for data in images]
    answers: dict[int, dict] = {}
    start = threading.Barrier(n)

    def ask(i: int) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            start.wait()
            res = client.post("/v1/detect", files={"file": (f"{i}.png", images[i], "image/png")})
            answers[i] = {"status": res.status_code, **res.json()}

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(answers) == list(range(n))
    for i, answer in answers.items():
        assert answer["status"] == 200 and answer["model_version"] == 1, answer
        assert answer["fake_probability"] == pytest.approx(alone[i], abs=1e-5)
    (stats,) = strict_server["client"].get(f"/v2/models/{MODEL_NAME}/stats").json()["model_stats"]
    sizes = {b["batch_size"]: b["compute_infer"]["count"] for b in stats["batch_stats"]}
    assert stats["version"] == "1" and stats["inference_count"] == n and stats["request_count"] == n
    assert stats["execution_count"] < n and max(sizes) > 1 and max(sizes) <= 8, sizes


def test_batches_never_mix_versions(server, tmp_path):
    """Requests for two versions queued together: each batch is one version's, each answer its own."""
    from r2m.serving.batching import Batcher
    from r2m.serving.model_store import load_version

    repo = tmp_path / "repo"
    export = server["params"].export.model_copy(update={"triton_max_queue_delay_us": 500_000})
    for v in (1, 2):
        publish(server["models"][v], repo, export)
    models = {v: load_version(repo, v) for v in (1, 2)}
    assert models[1].batching.max_batch_size == export.triton_max_batch_size
    assert models[1].batching.max_queue_delay_s == pytest.approx(0.5)
    images = [_image_bytes("PNG", seed=200 + i) for i in range(4)]
    rows = [to_pixel_array(Image.open(io.BytesIO(d)).convert("RGB"), 64, (0.5,) * 3, (0.5,) * 3)[None] for d in images]
    batcher = Batcher()
    try:
        order = [1, 1, 2, 1]  # v2's request arrives between v1's: it may not join their batch
        futures = [batcher.submit(models[v], x) for v, x in zip(order, rows)]
        results = [f.result(timeout=30) for f in futures]
    finally:
        batcher.stop()
    for v, data, (logits, prob) in zip(order, images, results):
        assert prob.shape == (1,) and prob[0] == pytest.approx(_expected(server["models"][v], data), abs=1e-5)
    stats = {s["version"]: {b["batch_size"]: b["compute_infer"]["count"] for b in s["batch_stats"]}
             for s in batcher.stats.model_stats(MODEL_NAME)}
    assert stats == {"1": {2: 1, 1: 1}, "2": {1: 1}}  # [v1 v1] [v2] [v1]: FIFO, one version per call


def _raw_request(port: int, head: str, body: bytes, timeout: float = 10.0) -> tuple[bytes, bool]:
    """Send `head` + `body` on a raw socket; (everything the server sent, whether it closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.encode() + body)
        received, closed = b"", False
        try:
            while chunk := sock.recv(65536):
                received += chunk
            closed = True
        except (TimeoutError, socket.timeout):
            pass
        except ConnectionResetError:
            closed = True
    return received, closed


@pytest.mark.parametrize("route,ctype", [("/v1/detect", "multipart/form-data; boundary=x"),
                                         (f"/v2/models/{MODEL_NAME}/infer", "application/json")])
def test_declared_too_large_body_gets_413_at_once_and_the_connection_closed(server, route, ctype):
    """Content-Length far over the limit, 100 bytes sent: 413 at once (nothing waited for), closed."""
    head = (f"POST {route} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
            "Content-Length: 99999999999\r\n\r\n")
    received, closed = _raw_request(server["port"], head, b"x" * 100)
    assert received.startswith(b"HTTP/1.1 413"), received[:200]
    assert b"serve.max_upload_bytes" in received and closed
    assert server["client"].get("/healthz").status_code == 200


def test_slow_clients_get_408_and_do_not_hold_the_server(strict_server):
    """50 connections trickling a body at 5 bytes/s (the minimum is 1000 after a 1 s grace): the
    server keeps answering others meanwhile, and each slow one gets a 408 and is closed."""
    port, n, declared = strict_server["port"], 50, 5000
    head = (f"POST /v2/models/{MODEL_NAME}/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n")
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(n)]
    replies = {i: b"" for i in range(n)}
    closed: set[int] = set()
    try:
        for s in socks:
            s.sendall(head.encode() + b"[")
            s.setblocking(False)
        ok = strict_server["client"].post("/v1/detect", files={"file": ("f.png", _image_bytes("PNG"), "image/png")})
        assert ok.status_code == 200  # answered while all 50 are open
        deadline = time.monotonic() + BODY_TIMEOUT_S + 20
        while len(closed) < n and time.monotonic() < deadline:
            for i, s in enumerate(socks):
                if i in closed:
                    continue
                try:
                    s.send(b"0")  # one byte per socket per round, ~5 bytes/s
                except (BrokenPipeError, ConnectionResetError, BlockingIOError):
                    pass
                try:
                    chunk = s.recv(65536)
                    if chunk:
                        replies[i] += chunk
                    else:
                        closed.add(i)
                except BlockingIOError:
                    pass
                except ConnectionResetError:
                    closed.add(i)
            time.sleep(0.2)
    finally:
        for s in socks:
            s.close()
    assert len(closed) == n, f"{n - len(closed)} slow connections still open"
    assert all(r.startswith(b"HTTP/1.1 408") and b"serve.min_body_bytes_per_s" in r for r in replies.values()), \
        [r[:120] for r in replies.values() if not r.startswith(b"HTTP/1.1 408")][:3]
    assert strict_server["client"].get("/healthz").status_code == 200


def test_sessions_cap_their_threads_and_do_not_spin(server):
    session = open_session(server["models"][1], threads=10_000)
    options = session.get_session_options()
    assert options.intra_op_num_threads == usable_cpus()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"


SERVER_PATH_MODULES = """
import sys
from fastapi.testclient import TestClient
from r2m.serving.app import create_app
import r2m.serving.__main__, r2m.serving.server
with TestClient(create_app(sys.argv[1], poll=False)) as client:
    res = client.post("/v1/detect", files={"file": ("f.png", open(sys.argv[2], "rb").read(), "image/png")})
    assert res.status_code == 200, res.text
print(" ".join(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "onnx", "sklearn")
                      or m.startswith(("r2m.export", "r2m.evaluation", "r2m.models")))) or "none")
"""


def test_the_server_path_imports_neither_torch_nor_export(server, tmp_path):
    png = tmp_path / "f.png"
    png.write_bytes(_image_bytes("PNG"))
    proc = subprocess.run([sys.executable, "-c", SERVER_PATH_MODULES, str(server["repo"]), str(png)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["none"], proc.stdout  # scored an upload without any of them


def _imports(folder: Path) -> set[str]:
    import ast

    found = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
    return found


def test_layers_import_downwards_only():
    """serving -> runtime <- export: serving imports no torch and no export (not even lazily), and
    runtime imports none of torch, onnx, export or serving."""
    src = Path(__file__).resolve().parents[1] / "src" / "r2m"
    serving, runtime = _imports(src / "serving"), _imports(src / "runtime")
    banned = ("torch", "torchvision", "r2m.export")
    assert not [m for m in serving if m.split(".")[0] in banned or m.startswith("r2m.export")], serving
    assert not [m for m in runtime if m.split(".")[0] in ("torch", "torchvision", "onnx")
                or m.startswith(("r2m.export", "r2m.serving"))], runtime


def test_the_server_image_installs_the_serving_requirements_without_torch():
    """deploy/requirements-serve.txt holds pyproject.toml's own requirements (no drift), none of
    the training stack, and deploy/Dockerfile's default stage installs it and r2m with --no-deps."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    deps = set(tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"])
    lines = [line.strip() for line in (root / "deploy" / "requirements-serve.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines and set(lines) <= deps, set(lines) - deps
    assert not [line for line in lines if line.split(">")[0].split("=")[0].lower()
                in ("torch", "torchvision", "open_clip_torch", "timm", "onnx", "scikit-learn", "mlflow", "prefect")]
    docker = (root / "deploy" / "Dockerfile").read_text()
    stages = docker.split("\nFROM ")
    serve = stages[-1]  # the last stage is what `docker build` builds by default
    assert serve.startswith("base AS serve") and "requirements-serve.txt" in serve
    assert "pip install --no-deps ." in serve and "download.pytorch.org" not in serve and '".[' not in serve
    assert '"-m", "r2m.serving"' in serve
