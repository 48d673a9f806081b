"""Serving speed: ONNX Runtime (fp32, dynamic int8) vs torch eager on the same checkpoint, same run,
plus an HTTP load test with a hot reload in the middle (issue 6). Not a test: run it by hand.

    .venv/bin/python bench/serve_bench.py [--models r2m-tiny ViT-B-32] [--threads 2]
                                          [--clients 8] [--requests 1000] [--seconds 8]

Per model (open_clip config, random weights, `pretrained=None`: no download):
- export with `r2m.export` (dynamo exporter), quantise to int8 (ORT dynamic), all in a temp folder;
- throughput (img/s) and per-call latency p50/p99 at batch 1 and 32 for torch eager
  (`inference_mode`), ORT fp32 and ORT int8, with the same thread count; the three engines run
  interleaved, repetition by repetition, so load from other processes hits them alike; each cell
  is bounded by `--seconds` and a call count;
- AUC of each engine on a synthetic labelled set (fake = pasted bright block), and |ΔAUC| vs torch:
  the accuracy cost of each speed-up.
Load test (the first model): `r2m serve` as a subprocess on loopback, `--clients` threads × `--requests`
POST /v1/detect each; `r2m publish` of a second version once half the requests are done; counts
errors (anything but 200) and client-side latency; checks the version switched.

Writes bench/results/serve_bench.{json,md} and prints the markdown table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _threads(n: int) -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)


def synthetic_set(n: int, size: int, seed: int = 0) -> tuple[list, np.ndarray]:
    """n PIL images (smooth colour noise), half with a pasted bright block (label 1)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images, labels = [], np.arange(n) % 2
    for label in labels:
        small = rng.uniform(40, 215, size=(8, 8, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(small).resize((size, size), Image.BILINEAR)).copy()
        if label:
            y, x = rng.integers(0, size - size // 3, size=2)
            img[y : y + size // 3, x : x + size // 3] = 250
        images.append(Image.fromarray(img))
    return images, labels


def build(model_name: str, folder: Path, threads: int) -> dict:
    """Checkpoint -> fp32 ONNX (r2m export path) -> int8 ONNX; sessions and the torch model."""
    import torch

    from r2m.config import ModelConfig, load_params
    from r2m.export.onnx_export import export_graph
    from r2m.export.quantize import quantize_int8
    from r2m.models import build_detector, preprocessing
    from r2m.serving.model_store import open_session

    torch.manual_seed(0)
    detector = build_detector(ModelConfig(name=model_name)).eval()
    params = load_params(root=folder)
    prep = preprocessing(params.model_copy(update={"model": ModelConfig(name=model_name)}))
    t = time.perf_counter()
    fp32 = export_graph(detector, folder / f"{model_name}.onnx", prep["image_size"], prep,
                        {"model_version": "bench"}, params.export.opset, "dynamo")
    export_s = time.perf_counter() - t
    t = time.perf_counter()
    int8 = quantize_int8(fp32)
    quant_s = time.perf_counter() - t
    providers = ["CPUExecutionProvider"]
    return {"detector": detector, "prep": prep, "fp32": fp32, "int8": int8, "export_s": export_s,
            "quant_s": quant_s, "sessions": {"ort-fp32": open_session(fp32, threads, providers),
                                             "ort-int8": open_session(int8, threads, providers)},
            "mb": {"fp32": fp32.stat().st_size / 2**20, "int8": int8.stat().st_size / 2**20}}


def engines(built: dict) -> dict:
    import torch

    detector = built["detector"]

    def torch_eager(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return torch.softmax(detector(torch.from_numpy(x)), -1)[:, 1].numpy()

    def ort(name: str):
        session = built["sessions"][name]
        return lambda x: session.run(["fake_probability"], {"pixel_values": x})[0]

    return {"torch-eager": torch_eager, "ort-fp32": ort("ort-fp32"), "ort-int8": ort("ort-int8")}


def time_engines(fns: dict, x: np.ndarray, seconds: float, max_calls: int = 200) -> dict:
    """Interleaved: each round calls every engine once; stop after `seconds` per engine or max_calls."""
    for fn in fns.values():  # warm-up
        fn(x)
    times = {name: [] for name in fns}
    while True:
        for name, fn in fns.items():
            t = time.perf_counter()
            fn(x)
            times[name].append(time.perf_counter() - t)
        spent = max(sum(v) for v in times.values())
        if spent > seconds or len(times[next(iter(fns))]) >= max_calls:
            break
    out = {}
    for name, ts in times.items():
        ts = np.array(ts)
        out[name] = {"calls": len(ts), "img_per_s": len(x) * len(ts) / ts.sum(),
                     "p50_ms": 1000 * float(np.percentile(ts, 50)), "p99_ms": 1000 * float(np.percentile(ts, 99))}
    return out


def auc_deltas(fns: dict, built: dict, n: int) -> dict:
    from sklearn.metrics import roc_auc_score

    from r2m.serving.preprocess import Preprocessing

    prep = Preprocessing.from_dict(built["prep"])
    images, labels = synthetic_set(n, built["prep"]["image_size"])
    x = np.stack([prep(img) for img in images])
    scores = {name: np.concatenate([fn(x[i : i + 32]) for i in range(0, n, 32)]) for name, fn in fns.items()}
    ref = scores["torch-eager"]
    return {name: {"auc": float(roc_auc_score(labels, s)), "d_auc": float(roc_auc_score(labels, s) - roc_auc_score(labels, ref)),
                   "max_abs_dp": float(np.abs(s - ref).max())} for name, s in scores.items()}


# -- HTTP load test --------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_test(model_name: str, folder: Path, clients: int, requests: int, threads: int) -> dict:
    """`r2m serve` subprocess; clients × requests POST /v1/detect; publish v2 at the half-way mark."""
    import httpx
    import torch

    from r2m.config import ModelConfig, load_params
    from r2m.export.onnx_export import export_graph
    from r2m.export.publish import publish
    from r2m.models import build_detector, preprocessing

    params = load_params(root=folder)
    prep = preprocessing(params.model_copy(update={"model": ModelConfig(name=model_name)}))
    paths = []
    for version in (1, 2):
        torch.manual_seed(version)
        det = build_detector(ModelConfig(name=model_name)).eval()
        paths.append(export_graph(det, folder / f"load-v{version}.onnx", prep["image_size"], prep,
                                  {"model_version": str(version)}, params.export.opset, "torchscript"))
    repo = folder / "repo"
    publish(paths[0], repo, params.export)
    port = _free_port()
    env = {**os.environ, "R2M_PROJECT_ROOT": str(folder)}
    server = subprocess.Popen([sys.executable, "-m", "r2m.cli", "serve", "--repository", str(repo), "--port",
                               str(port), "--threads", str(threads)], cwd=folder, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(base + "/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.2)
        buf = io.BytesIO()
        synthetic_set(1, 256)[0][0].save(buf, format="PNG")
        png = buf.getvalue()
        done, lock = [0], threading.Lock()
        results: list[tuple[int, int, float]] = []
        half = clients * requests // 2
        published = threading.Event()

        def client() -> None:
            with httpx.Client(base_url=base, timeout=60) as http:
                for _ in range(requests):
                    t = time.perf_counter()
                    try:
                        res = http.post("/v1/detect", files={"file": ("face.png", png, "image/png")})
                        status, version = res.status_code, res.json().get("model_version", -1)
                    except (httpx.HTTPError, ValueError):
                        status, version = 599, -1
                    dt = time.perf_counter() - t
                    with lock:
                        results.append((status, version, dt))
                        done[0] += 1
                        trigger = done[0] == half
                    if trigger:
                        publish(paths[1], repo, params.export)
                        published.set()

        t0 = time.perf_counter()
        workers = [threading.Thread(target=client) for _ in range(clients)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        wall = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(timeout=30)
    lat = np.array([r[2] for r in results])
    versions = [r[1] for r in results]
    return {"model": model_name, "clients": clients, "requests": len(results),
            "errors": sum(r[0] != 200 for r in results), "req_per_s": len(results) / wall,
            "p50_ms": 1000 * float(np.percentile(lat, 50)), "p99_ms": 1000 * float(np.percentile(lat, 99)),
            "answered_v1": versions.count(1), "answered_v2": versions.count(2), "reload_published": published.is_set()}


# -- report ----------------------------------------------------------------------------------------

def markdown(report: dict) -> str:
    lines = [f"# serve_bench ({report['machine']}, {report['threads']} threads, {report['date']})", "",
             "| model | engine | batch | img/s | p50 ms | p99 ms | × torch | ΔAUC vs torch | max abs Δp |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in report["models"]:
        for batch, cells in m["timing"].items():
            base = cells["torch-eager"]["img_per_s"]
            for engine, c in cells.items():
                acc = m["accuracy"][engine]
                lines.append(f"| {m['model']} | {engine} | {batch} | {c['img_per_s']:.1f} | {c['p50_ms']:.2f} | "
                             f"{c['p99_ms']:.2f} | {c['img_per_s'] / base:.2f} | {acc['d_auc']:+.4f} | {acc['max_abs_dp']:.1e} |")
    lines += ["", "| model | export s (dynamo) | int8 quantise s | fp32 MB | int8 MB | AUC set |", "|---|---:|---:|---:|---:|---:|"]
    for m in report["models"]:
        lines.append(f"| {m['model']} | {m['export_s']:.1f} | {m['quant_s']:.1f} | {m['mb']['fp32']:.1f} | "
                     f"{m['mb']['int8']:.1f} | {m['auc_n']} imgs |")
    if report.get("load"):
        lt = report["load"]
        lines += ["", "Load test (HTTP POST /v1/detect, loopback, hot reload at the half-way mark):", "",
                  "| model | clients × requests | errors | req/s | p50 ms | p99 ms | answered v1 / v2 |",
                  "|---|---|---:|---:|---:|---:|---|",
                  f"| {lt['model']} | {lt['clients']} × {lt['requests'] // lt['clients']} | {lt['errors']} | "
                  f"{lt['req_per_s']:.1f} | {lt['p50_ms']:.1f} | {lt['p99_ms']:.1f} | {lt['answered_v1']} / {lt['answered_v2']} |"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["r2m-tiny", "ViT-B-32"])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--seconds", type=float, default=8.0, help="time budget per engine and batch size")
    parser.add_argument("--auc-n", type=int, default=128)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=1000, help="per client")
    parser.add_argument("--no-load", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "serve_bench")
    args = parser.parse_args()
    _threads(args.threads)
    import onnxruntime
    import torch

    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "threads": args.threads, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "models": []}
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        for name in args.models:
            folder = Path(tmp) / name
            folder.mkdir()
            built = build(name, folder, args.threads)
            fns = engines(built)
            size = built["prep"]["image_size"]
            timing = {}
            for batch in (1, 32):
                x = np.random.default_rng(batch).uniform(-1, 1, size=(batch, 3, size, size)).astype(np.float32)
                timing[batch] = time_engines(fns, x, args.seconds)
                print(name, batch, json.dumps(timing[batch]), flush=True)
            accuracy = auc_deltas(fns, built, args.auc_n)
            report["models"].append({"model": name, "timing": timing, "accuracy": accuracy, "auc_n": args.auc_n,
                                     "export_s": built["export_s"], "quant_s": built["quant_s"], "mb": built["mb"]})
            del built, fns
        if not args.no_load:
            folder = Path(tmp) / "load"
            folder.mkdir()
            report["load"] = load_test(args.models[0], folder, args.clients, args.requests, args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    text = markdown(report)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
