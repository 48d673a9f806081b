"""Serving the real detector: torch eager vs ONNX Runtime fp32, int8 dynamic and int8 static QDQ
on the published champion, on the real seen test splits and unseen sets, plus an HTTP load test
with and without batching and a hot reload in the middle. Not a test: run it by hand, on a quiet box.

    .venv/bin/python bench/serve_bench.py                       # the project at R2M_PROJECT_ROOT / the cwd
    .venv/bin/python bench/serve_bench.py --checkpoint FILE     # any merged checkpoint (exported here)
    .venv/bin/python bench/serve_bench.py --smoke               # a short proof that the script works

What it measures (every timing as a ratio against a baseline of the same run):
- the model: the published champion of the project (the version config.pbtxt serves in
  `paths.model_repository`, else the newest) and the merged checkpoint it came from (found by the
  checkpoint sha256 in its ONNX lineage: the registry's `r2m-detector` version, else a file under
  `paths.artifacts` whose sidecar records that sha256), or `--checkpoint` (exported here);
- engines, all with `--threads` threads: torch eager (`inference_mode`), ORT fp32 (the published
  file), ORT int8 dynamic, ORT int8 static QDQ (per-channel int8 weights, activations calibrated on
  seen **validation** images, `r2m.export.quantize`) with every calibration variant of
  `--calibrations`; the targets read the loop's own variant (`export.int8_calibration`), and the
  report also names the one with the smallest worst |ΔAUC| on the seen validation images;
- accuracy: AUC of each engine on every seen test split and unseen set, |ΔAUC| against ORT fp32;
- speed: img/s at batch 1 and 32 of every engine (every static variant too), interleaved round by
  round (load from other processes hits them alike); ratios ORT fp32 / torch, int8 / ORT fp32;
- what bounds int8 (`--profile`): ONNX Runtime's profiler on fp32 and the kept static int8 at
  batch 32: time per op type, and which op types of the optimised graph stay float;
- HTTP: `python -m r2m.serving` (torch-free) as a subprocess, `--clients` threads × `--requests`
  POST /v1/detect of real test images (each encoded once, sent on a kept-alive connection), once with batching off (config.pbtxt `max_batch_size: 1`:
  one session call per request, the server as it was) and once as params.yaml publishes it
  (`export.triton_max_batch_size`, `triton_max_queue_delay_us`); a second version is published
  half-way through (hot reload). Counts errors, answers that differ from scoring the image alone,
  req/s, p50/p99 and the mean batch the server ran (its /v2/models/r2m_detector/stats).

Targets it reports against (docs/usage.md, "Serving"): int8 static |ΔAUC| <= 0.002 on every seen test task
and >= 1.5x ORT fp32 at batch 32; ORT fp32 >= 1.5x torch eager at batch 32; HTTP with batching
>= 2x the req/s without, at no worse p99, 0 errors across the hot reload.

Writes bench/results/serve_bench.{json,md} (`--out`; `--smoke` writes serve_bench_smoke.*) and
prints the markdown. Paths in the JSON are relative to the project root where they lie inside it.
"""

from __future__ import annotations

import argparse
import http.client
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
BATCHES = (1, 32)
CALIBRATIONS = {  # name -> Int8Recipe arguments (static QDQ); ONNX Runtime's calibration options
    "minmax": {"calibration": "minmax"},
    "minmax-avg": {"calibration": "minmax", "extra_options": (("CalibMovingAverage", True),)},
    "entropy": {"calibration": "entropy"},
    "percentile": {"calibration": "percentile"},
    "minmax-s8": {"calibration": "minmax", "activations": "int8"},
}
TARGETS = {"int8_static_max_abs_dauc_seen": 0.002, "int8_static_vs_fp32_b32": 1.5, "fp32_vs_torch_b32": 1.5,
           "http_batching_vs_off": 2.0}


def _threads(n: int) -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)


# -- the champion ----------------------------------------------------------------------------------

def _registry_checkpoint(params, sha: str) -> Path | None:
    """The checkpoint of the `r2m-detector` version whose sha256 is `sha`, from the registry."""
    uri = params.tracking_uri
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return None
    from r2m.tracking import mlflow_store, registry
    from r2m.tracking.artifacts import resolve_checkpoint

    client = mlflow_store.client(params)
    try:
        versions = client.search_model_versions(f"name='{registry.DETECTOR}' and tags.`sha256` = '{sha}'")
    except Exception:  # no detector registered yet
        return None
    for mv in sorted(versions, key=lambda v: -int(v.version)):
        try:
            return resolve_checkpoint(params, client, mv)
        except Exception as err:
            print(f"registry: {mv.name} v{mv.version}: {err}", file=sys.stderr)
    return None


def _artifacts_checkpoint(params, sha: str) -> Path | None:
    """A checkpoint under `paths.artifacts` whose sidecar records `sha`."""
    from r2m.checkpoint import read_meta

    for path in sorted(params.path("artifacts").rglob("*.safetensors")):
        try:
            if read_meta(path).get("sha256") == sha:
                return path
        except Exception:
            continue
    return None


def find_champion(params, checkpoint: Path | None, onnx: Path | None) -> dict:
    """{"onnx", "checkpoint", "version", "source"}: the published champion and its checkpoint."""
    from r2m.checkpoint import file_sha256
    from r2m.export.metadata import read_metadata
    from r2m.runtime.repository import MODEL_FILE, list_versions, model_dir, served_version

    repository = params.path("model_repository")
    version = None
    if onnx is None and checkpoint is None:
        versions = list_versions(repository)
        if not versions:
            sys.exit(f"serve_bench: no published model in {model_dir(repository)} (run `r2m run` there, "
                     "or give --checkpoint FILE)")
        named = served_version(repository)
        version = named if named in versions else versions[-1]
        onnx = model_dir(repository) / str(version) / MODEL_FILE
    if onnx is None:
        return {"onnx": None, "checkpoint": checkpoint, "version": None, "source": "--checkpoint"}
    lineage = read_metadata(onnx)["lineage"]
    sha = lineage.get("checkpoint_sha256")
    if checkpoint is None:
        checkpoint = _registry_checkpoint(params, sha) or _artifacts_checkpoint(params, sha)
        if checkpoint is None:
            sys.exit(f"serve_bench: {onnx} was exported from checkpoint sha256 {sha}, found neither in the registry "
                     f"nor under {params.path('artifacts')}; give it with --checkpoint FILE")
    elif file_sha256(checkpoint) != sha:
        sys.exit(f"serve_bench: --checkpoint {checkpoint} is not the checkpoint {onnx} was exported from (sha256 {sha})")
    return {"onnx": onnx, "checkpoint": checkpoint, "version": version, "model_version": lineage.get("model_version"),
            "source": f"published version {version}" if version else "--onnx"}


# -- data ------------------------------------------------------------------------------------------

def load_tasks(params) -> tuple[list, list]:
    """(seen, unseen) validated datasets of the data root (rejected ones are reported and skipped)."""
    from r2m.data import validate_data_root

    seen, unseen = [], []
    for folder, result in validate_data_root(params.path("data_root"), params.data):
        if isinstance(result, Exception):
            print(f"skipping {folder}: {result}", file=sys.stderr)
            continue
        (seen if result.is_seen else unseen).append(result)
    if not seen:
        sys.exit(f"serve_bench: no seen dataset under {params.path('data_root')}")
    return seen, unseen


def task_images(datasets: list, split: str, preprocess, max_images: int | None) -> dict:
    """{task: (x [n, 3, H, W], labels, paths)} of each dataset's `split` (balanced cap `max_images`)."""
    from r2m.data import balanced_sample, load_image

    out = {}
    for ds in datasets:
        samples = ds.split(split)
        if max_images:
            samples = balanced_sample(samples, max_images)
        x = np.stack([preprocess(load_image(s.path)) for s in samples])
        out[ds.name] = (x, np.array([s.label for s in samples]), [s.path for s in samples])
    return out


# -- engines ---------------------------------------------------------------------------------------

def build_engines(champion: dict, params, folder: Path, threads: int, calibrations: list[str],
                  seen: list, cal_samples: int) -> dict:
    """{"fns": {engine: x -> fake_probability}, "files": {...}, "static": {variant: path}, "prep"}."""
    import torch

    from r2m.export.onnx_export import export_checkpoint
    from r2m.export.quantize import CalibrationImages, Int8Recipe, calibration_samples, quantize_int8
    from r2m.export.metadata import read_metadata
    from r2m.models import load_detector
    from r2m.runtime.preprocess import Preprocessing
    from r2m.runtime.session import open_session

    detector = load_detector(champion["checkpoint"]).eval()
    onnx = champion["onnx"]
    seconds = {}
    if onnx is None:  # a checkpoint given alone: export it as `r2m export` would
        t = time.perf_counter()
        onnx = export_checkpoint(champion["checkpoint"], folder / "model.onnx", params, int8=False).onnx_path
        seconds["export"] = time.perf_counter() - t
        champion["onnx"] = onnx
    prep = Preprocessing.from_dict(read_metadata(onnx)["preprocessing"])
    t = time.perf_counter()
    dynamic = quantize_int8(onnx, folder / "int8-dynamic.onnx", Int8Recipe("dynamic"))
    seconds["quantize int8-dynamic"] = time.perf_counter() - t
    reader = CalibrationImages(calibration_samples(seen, cal_samples), prep)
    static = {}
    for name in calibrations:
        t = time.perf_counter()
        try:
            recipe = Int8Recipe("static", **CALIBRATIONS[name], float_convs=params.export.int8_float_convs)
            static[name] = quantize_int8(onnx, folder / f"int8-static-{name}.onnx", recipe, reader)
        except Exception as err:  # one calibration failing must not lose the others
            print(f"int8 static {name}: {err}", file=sys.stderr)
            continue
        seconds[f"quantize int8-static-{name}"] = time.perf_counter() - t
    providers = ["CPUExecutionProvider"]
    files = {"ort-fp32": onnx, "ort-int8-dynamic": dynamic, **{f"ort-int8-static-{n}": p for n, p in static.items()}}
    sessions = {name: open_session(path, threads, providers) for name, path in files.items()}

    def torch_eager(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return torch.softmax(detector(torch.from_numpy(x)), -1)[:, 1].numpy()

    def ort(session):
        return lambda x: session.run(["fake_probability"], {"pixel_values": x})[0]

    fns = {"torch-eager": torch_eager, **{name: ort(s) for name, s in sessions.items()}}
    return {"fns": fns, "files": files, "prep": prep, "seconds": seconds, "reader": reader,
            "calibration_images": len(reader.samples)}


def score_all(fns: dict, tasks: dict, batch: int = 32) -> dict:
    """{engine: {task: scores}}."""
    return {name: {t: np.concatenate([fn(x[i : i + batch]) for i in range(0, len(x), batch)])
                   for t, (x, _, _) in tasks.items()} for name, fn in fns.items()}


def aucs(scores: dict, tasks: dict) -> dict:
    from r2m.evaluation.metrics import auc

    return {name: {t: auc(tasks[t][1], s, task=t) for t, s in per.items()} for name, per in scores.items()}


def time_engines(fns: dict, x: np.ndarray, seconds: float, max_calls: int = 400) -> dict:
    """Interleaved: each round calls every engine once; stop after `seconds` per engine or max_calls."""
    for fn in fns.values():  # warm-up
        fn(x)
    times = {name: [] for name in fns}
    while True:
        for name, fn in fns.items():
            t = time.perf_counter()
            fn(x)
            times[name].append(time.perf_counter() - t)
        if max(sum(v) for v in times.values()) > seconds or len(times[next(iter(fns))]) >= max_calls:
            break
    return {name: {"calls": len(ts), "img_per_s": len(x) * len(ts) / sum(ts),
                   "p50_ms": 1000 * float(np.percentile(ts, 50)), "p99_ms": 1000 * float(np.percentile(ts, 99))}
            for name, ts in times.items()}


# -- where the time goes -----------------------------------------------------------------------------

def profile(path: Path, x: np.ndarray, threads: int, runs: int, folder: Path) -> dict:
    """ONNX Runtime's profiler over `runs` calls on `x`: share of node time per op type, and the
    op types of the optimised graph (what runs as int8, what stays float)."""
    import onnx as onnx_lib

    from r2m.runtime.session import open_session, session_options

    options = session_options(threads)
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / f"profile-{path.stem}")
    options.optimized_model_filepath = str(folder / f"optimised-{path.name}")
    session = open_session(path, threads, ["CPUExecutionProvider"], options)
    session.run(None, {"pixel_values": x})
    for _ in range(runs):
        session.run(None, {"pixel_values": x})
    trace = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = {}
    for event in trace:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            op = event.get("args", {}).get("op_name", "?")
            per_op[op] = per_op.get(op, 0.0) + float(event.get("dur", 0))
    total = sum(per_op.values()) or 1.0
    graph = onnx_lib.load(options.optimized_model_filepath)
    ops: dict[str, int] = {}
    for node in graph.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"time_share": {k: v / total for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])},
            "optimised_ops": dict(sorted(ops.items(), key=lambda kv: -kv[1]))}


def activation_sqnr(fp32: Path, int8: Path, reader, folder: Path) -> dict:
    """Where int8 loses the signal: the SQNR (dB, ONNX Runtime's qdq_loss_debug) of the int8 model's
    activations against fp32's on the calibration images, at every Conv output in graph order, and
    at the pooled feature the head reads."""
    import onnx as onnx_lib
    from onnxruntime.quantization.qdq_loss_debug import (collect_activations, compute_activation_error,
                                                         create_activation_matching,
                                                         modify_model_output_intermediate_tensors)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from r2m.export.quantize import float_nodes

    prepared = folder / "sqnr-float.onnx"  # the float graph quantize_int8 started from (same tensor names)
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=False)
    model = onnx_lib.load(str(prepared))
    float_nodes(model)
    onnx_lib.save(model, str(prepared))
    modify_model_output_intermediate_tensors(str(prepared), str(folder / "sqnr-float-aug.onnx"))
    modify_model_output_intermediate_tensors(str(int8), str(folder / "sqnr-int8-aug.onnx"))
    errors = compute_activation_error(create_activation_matching(
        collect_activations(str(folder / "sqnr-int8-aug.onnx"), reader),
        collect_activations(str(folder / "sqnr-float-aug.onnx"), reader)))
    producer = {out: node for node in model.graph.node for out in node.output}
    convs = [o for n in model.graph.node if n.op_type == "Conv" for o in n.output if o in errors]
    head = producer["logits"]
    while head.op_type not in ("Gemm", "MatMul"):
        head = producer[next(i for i in head.input if i in producer)]
    feature = next(i for i in head.input if i in producer)
    while feature not in errors and feature in producer:  # the nearest quantised tensor the head reads from
        feature = next((i for i in producer[feature].input if i in producer or i in errors), None)
    return {"conv_outputs_db": [float(errors[o]["xmodel_err"]) for o in convs],
            "feature_db": float(errors[feature]["xmodel_err"]) if feature in errors else None, "feature": feature}


def preprocess_share(paths: list, prep, fp32_fn, x1: np.ndarray, repeats: int = 3) -> float:
    """Decode + preprocess of one upload relative to one ORT fp32 batch-1 call (what a request
    costs the server besides HTTP)."""
    from r2m.data.images import decode_image

    blobs = [Path(p).read_bytes() for p in paths]
    t = time.perf_counter()
    for _ in range(repeats):
        for b, p in zip(blobs, paths):
            prep(decode_image(b, p))
    decode = (time.perf_counter() - t) / (repeats * len(blobs))
    fp32_fn(x1)
    t = time.perf_counter()
    for _ in range(repeats * 10):
        fp32_fn(x1)
    infer = (time.perf_counter() - t) / (repeats * 10)
    return decode / infer


# -- HTTP load test ----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_test(onnx: Path, params, folder: Path, clients: int, requests: int, threads: int, uploads: list,
              expected: dict, batching: bool, python: str) -> dict:
    """`python -m r2m.serving` subprocess; clients × requests POST /v1/detect; publish v2 half-way."""
    import httpx
    import psutil
    import yaml

    from r2m.export.publish import publish

    export_cfg = params.export if batching else params.export.model_copy(update={"triton_max_batch_size": 1})
    repo = folder / ("repo-batching" if batching else "repo-off")
    publish(onnx, repo, export_cfg)
    port = _free_port()
    # the project's params, polling the repository every 0.2 s so the hot reload lands within the run
    server_params = folder / "server-params.yaml"
    raw = yaml.safe_load(Path(params.root / "params.yaml").read_text()) if (params.root / "params.yaml").is_file() else {}
    raw = raw or {}
    raw["serve"] = {**(raw.get("serve") or {}), "poll_interval_s": 0.2}
    server_params.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "R2M_PROJECT_ROOT": str(params.root), "R2M_PARAMS": str(server_params),
           "OMP_NUM_THREADS": str(threads)}
    log = open(folder / f"server-{'batching' if batching else 'off'}.log", "wb")
    server = subprocess.Popen([python, "-m", "r2m.serving", "--repository", str(repo), "--port", str(port),
                               "--threads", str(threads)], env=env, stdout=log, stderr=subprocess.STDOUT)
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
                raise RuntimeError(f"server did not start (log: {folder / log.name})")
            time.sleep(0.2)
        done, lock = [0], threading.Lock()
        results: list[tuple[int, int, float, bool]] = []
        half = clients * requests // 2
        published = threading.Event()
        # each upload's multipart request encoded once (by httpx), then sent over a kept-alive
        # http.client connection: the load clients share the server's cores, so they stay cheap
        encoded = []
        for name, data in uploads:
            req = httpx.Request("POST", base + "/v1/detect", files={"file": (Path(name).name, data, "application/octet-stream")})
            encoded.append((name, req.read(), req.headers["content-type"]))

        def reload() -> None:
            publish(onnx, repo, export_cfg)  # version 2: the same file, a hot reload
            published.set()

        def client(k: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            for i in range(requests):
                name, body, ctype = encoded[(k * requests + i) % len(encoded)]
                t = time.perf_counter()
                try:
                    conn.request("POST", "/v1/detect", body=body, headers={"Content-Type": ctype})
                    res = conn.getresponse()
                    answer = json.loads(res.read())
                    status, version = res.status, answer.get("model_version", -1)
                    right = status == 200 and abs(answer["fake_probability"] - expected[name]) <= 1e-4
                except (OSError, http.client.HTTPException, ValueError, KeyError):
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                    status, version, right = 599, -1, False
                dt = time.perf_counter() - t
                with lock:
                    results.append((status, version, dt, right))
                    done[0] += 1
                    trigger = done[0] == half
                if trigger:
                    threading.Thread(target=reload).start()
            conn.close()

        proc, me = psutil.Process(server.pid), psutil.Process()
        cpu0, mine0 = proc.cpu_times(), me.cpu_times()
        t0 = time.perf_counter()
        workers = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        wall = time.perf_counter() - t0
        cpu1, mine1 = proc.cpu_times(), me.cpu_times()
        stats = httpx.get(base + "/v2/models/r2m_detector/stats").json()["model_stats"]
        deadline = time.monotonic() + 15  # the hot reload: the server switches to version 2 within its poll
        served_after = None
        while served_after != 2 and time.monotonic() < deadline:
            served_after = httpx.get(base + "/healthz").json().get("model_version")
            time.sleep(0.1)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    lat = np.array([r[2] for r in results])
    versions = [r[1] for r in results]
    rows = sum(s["inference_count"] for s in stats)
    calls = sum(s["execution_count"] for s in stats)
    server_cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    infer_s = sum(b["compute_infer"]["ns"] for s in stats for b in s["batch_stats"]) / 1e9  # wall time in session calls
    return {"batching": batching, "max_batch_size": export_cfg.triton_max_batch_size,
            "max_queue_delay_us": export_cfg.triton_max_queue_delay_us, "clients": clients,
            "requests": len(results), "errors": sum(r[0] != 200 for r in results),
            "wrong_answers": sum(r[0] == 200 and not r[3] for r in results), "req_per_s": len(results) / wall,
            "p50_ms": 1000 * float(np.percentile(lat, 50)), "p99_ms": 1000 * float(np.percentile(lat, 99)),
            "answered_v1": versions.count(1), "answered_v2": versions.count(2),
            "reload_published": published.is_set(), "served_after": served_after,
            "mean_batch": rows / calls if calls else None,
            # what bounds req/s: the server's CPU seconds per wall second (2 = both cores), the wall
            # seconds spent inside session calls per wall second (batching on: how busy the one
            # inference thread is), and the load clients' own CPU per wall second
            "server_cpu_per_wall_s": server_cpu / wall, "session_s_per_wall_s": infer_s / wall,
            "client_cpu_per_wall_s": ((mine1.user + mine1.system) - (mine0.user + mine0.system)) / wall,
            "server_stats": stats}


# -- report ----------------------------------------------------------------------------------------

def markdown(report: dict) -> str:
    m = report["model"]
    lines = [f"# serve_bench ({report['machine']}, {report['threads']} threads, {report['date']})", ""]
    if report.get("smoke"):
        lines += ["**SMOKE RUN** (reduced images, seconds and requests, on a shared busy box): it proves the script "
                  "runs; none of its numbers is a measurement.", ""]
    lines += [f"Model: {m['source']} (`{m['onnx']}`, model version {m.get('model_version')}), checkpoint `{m['checkpoint']}`. "
              f"Images per task: {report['images_per_task'] or 'all'}; int8 static calibrated on "
              f"{report['calibration_images']} seen validation images; the targets read **{report['static_kept']}**, "
              f"the loop's int8 challenger (export.int8_calibration); smallest worst |ΔAUC| on seen validation: "
              f"{report.get('static_best_on_val')}.", "",
              "Targets (docs/usage.md, \"Serving\"): int8 static |ΔAUC| ≤ 0.002 on every seen test task and ≥ 1.5× ORT fp32 "
              "at batch 32; ORT fp32 ≥ 1.5× torch eager at batch 32; HTTP with batching ≥ 2× without, p99 no worse, "
              "0 errors across the hot reload.", "", "## Accuracy: AUC, and ΔAUC against ORT fp32", ""]
    engines = list(report["auc"])
    tasks = list(report["auc"]["ort-fp32"])
    lines += ["| task | role | " + " | ".join(engines) + " |", "|---|---|" + "---:|" * len(engines)]
    for t in tasks:
        ref = report["auc"]["ort-fp32"][t]
        cells = [f"{report['auc'][e][t]:.4f}" + ("" if e == "ort-fp32" else f" ({report['auc'][e][t] - ref:+.4f})")
                 for e in engines]
        lines.append(f"| {t} | {report['roles'][t]} | " + " | ".join(cells) + " |")
    lines += ["", "Worst |ΔAUC| against ORT fp32 (seen test / unseen / seen validation):", "",
              "| engine | seen test | unseen | seen val |", "|---|---:|---:|---:|"]
    for e, d in report["worst_dauc"].items():
        lines.append(f"| {e} | {d['seen']:.4f} | {d['unseen']:.4f} | {d['val']:.4f} |")
    lines += ["", "## Speed (img/s; ratios within this run)", "",
              "| engine | batch | img/s | p50 ms | p99 ms | × torch eager | × ORT fp32 |", "|---|---:|---:|---:|---:|---:|---:|"]
    for batch, cells in report["timing"].items():
        for e, c in cells.items():
            lines.append(f"| {e} | {batch} | {c['img_per_s']:.1f} | {c['p50_ms']:.2f} | {c['p99_ms']:.2f} | "
                         f"{c['img_per_s'] / cells['torch-eager']['img_per_s']:.2f} | "
                         f"{c['img_per_s'] / cells['ort-fp32']['img_per_s']:.2f} |")
    r = report["ratios"]
    lines += ["", "| target | measured | target | met |", "|---|---:|---:|---|"]
    for key, label in (("int8_static_max_abs_dauc_seen", "int8 static worst \\|ΔAUC\\|, seen test"),
                       ("int8_static_vs_fp32_b32", "int8 static / ORT fp32, batch 32"),
                       ("fp32_vs_torch_b32", "ORT fp32 / torch eager, batch 32"),
                       ("http_batching_vs_off", "HTTP req/s, batching / off")):
        if r.get(key) is None:
            continue
        met = r[key] <= TARGETS[key] if key.endswith("dauc_seen") else r[key] >= TARGETS[key]
        lines.append(f"| {label} | {r[key]:.4f} | {TARGETS[key]:g} | {'yes' if met else 'no'} |")
    if report.get("profile"):
        lines += ["", "## Where the time goes (ORT profiler, batch 32)", ""]
        for e, p in report["profile"].items():
            top = ", ".join(f"{op} {share:.0%}" for op, share in list(p["time_share"].items())[:8])
            ops = ", ".join(f"{op} {n}" for op, n in p["optimised_ops"].items())
            lines += [f"- **{e}** time per op type: {top}", f"  optimised graph: {ops}"]
        if report.get("sqnr"):
            q = report["sqnr"]["conv_outputs_db"]
            lines.append(f"- {report['static_kept']} activations against fp32 (SQNR, calibration images): "
                         f"{q[0]:.1f} dB after the first conv, {np.median(q):.1f} dB median over the {len(q)} conv "
                         f"outputs, {q[-1]:.1f} dB after the last; {report['sqnr']['feature_db']:.1f} dB at "
                         f"`{report['sqnr']['feature']}`, the last int8 tensor before the float head")
        if report.get("preprocess_vs_inference") is not None:
            lines.append(f"- decode + preprocess of one upload = {report['preprocess_vs_inference']:.2f}× one ORT fp32 "
                         "batch-1 call")
    if report.get("load"):
        lines += ["", "## HTTP load (POST /v1/detect of real test images, loopback, hot reload half-way)", "",
                  "| batching | max batch / delay µs | clients × requests | errors | wrong answers | req/s | p50 ms | p99 ms "
                  "| mean batch | answered v1 / v2 |", "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for lt in report["load"]:
            mean = f"{lt['mean_batch']:.1f}" if lt["mean_batch"] else "-"
            lines.append(f"| {'on' if lt['batching'] else 'off'} | {lt['max_batch_size']} / {lt['max_queue_delay_us']} | "
                         f"{lt['clients']} × {lt['requests'] // lt['clients']} | {lt['errors']} | {lt['wrong_answers']} | "
                         f"{lt['req_per_s']:.1f} | {lt['p50_ms']:.1f} | {lt['p99_ms']:.1f} | {mean} | "
                         f"{lt['answered_v1']} / {lt['answered_v2']} (then {lt['served_after']}) |")
        lines += ["", "What bounds req/s (CPU seconds per wall second; the box has "
                  f"{os.cpu_count()} cores):", "",
                  "| batching | server CPU | inside session calls (wall) | load clients' CPU |", "|---|---:|---:|---:|"]
        for lt in report["load"]:
            lines.append(f"| {'on' if lt['batching'] else 'off'} | {lt['server_cpu_per_wall_s']:.2f} | "
                         f"{lt['session_s_per_wall_s']:.2f} | {lt['client_cpu_per_wall_s']:.2f} |")
        if r.get("http_p99_batching_vs_off") is not None:
            lines.append(f"\nreq/s batching / off = {r['http_batching_vs_off']:.2f}×; p99 batching / off = "
                         f"{r['http_p99_batching_vs_off']:.2f}×")
    lines += ["", "Seconds spent: " + ", ".join(f"{k} {v:.1f}" for k, v in report["seconds"].items())]
    return "\n".join(lines) + "\n"


def _relative(path, root: Path) -> str | None:
    from r2m.config import record_path

    return record_path(path, root) if path else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, default=None, help="project root (default: R2M_PROJECT_ROOT / the cwd's)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="merged checkpoint (default: the champion's)")
    parser.add_argument("--onnx", type=Path, default=None, help="ONNX file instead of the published champion")
    parser.add_argument("--threads", type=int, default=None, help="threads for every engine and the server "
                        "(default: the CPUs this process may use)")
    parser.add_argument("--seconds", type=float, default=10.0, help="time budget per engine and batch size")
    parser.add_argument("--max-images", type=int, default=None, help="cap images per task (balanced; default all)")
    parser.add_argument("--calibration-samples", type=int, default=None,
                        help="seen validation images to calibrate on (default: export.int8_calibration_samples)")
    parser.add_argument("--calibrations", nargs="+", default=None, choices=list(CALIBRATIONS),
                        help="static int8 calibration variants to try (default: all)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=500, help="per client")
    parser.add_argument("--no-load", action="store_true", help="skip the HTTP load test")
    parser.add_argument("--server-python", default=sys.executable,
                        help="interpreter that runs the server (e.g. a serving-only venv: what deploy/Dockerfile installs)")
    parser.add_argument("--no-profile", action="store_true", help="skip the ORT profile")
    parser.add_argument("--smoke", action="store_true", help="64 images per task, 1 s per cell, 2 calibrations "
                        "(unless --calibrations), 8 x 10 requests: proves the script runs, measures nothing")
    parser.add_argument("--out", type=Path, default=None, help="result stem (default bench/results/serve_bench)")
    args = parser.parse_args()
    if args.smoke:
        args.max_images, args.seconds = args.max_images or 64, min(args.seconds, 1.0)
        args.calibrations = args.calibrations or ["minmax", "percentile"]
        args.requests = min(args.requests, 10)
        args.calibration_samples = args.calibration_samples or 64
    args.calibrations = args.calibrations or list(CALIBRATIONS)
    out = args.out or HERE / "results" / ("serve_bench_smoke" if args.smoke else "serve_bench")

    from r2m.config import load_params
    from r2m.threads import usable_cpus

    threads = args.threads or usable_cpus()
    _threads(threads)
    import onnxruntime
    import torch

    params = load_params(root=args.project)
    started = time.perf_counter()
    champion = find_champion(params, args.checkpoint, args.onnx)
    seen, unseen = load_tasks(params)
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "threads": threads,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
              "onnxruntime": onnxruntime.__version__, "smoke": args.smoke, "images_per_task": args.max_images,
              "roles": {**{d.name: "seen" for d in seen}, **{d.name: "unseen" for d in unseen}}}
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        folder = Path(tmp)
        built = build_engines(champion, params, folder, threads, args.calibrations, seen,
                              args.calibration_samples or params.export.int8_calibration_samples)
        fns, prep = built["fns"], built["prep"]
        seconds = dict(built["seconds"])
        t = time.perf_counter()
        test = {**task_images(seen, "test", prep, args.max_images), **task_images(unseen, "test", prep, args.max_images)}
        val = task_images(seen, "val", prep, args.max_images)
        seconds["load images"] = time.perf_counter() - t
        t = time.perf_counter()
        test_auc, val_auc = aucs(score_all(fns, test), test), aucs(score_all(fns, val), val)
        seconds["score"] = time.perf_counter() - t
        seen_names = [d.name for d in seen]

        def worst(engine: str, names, table) -> float:
            return max((abs(table[engine][n] - table["ort-fp32"][n]) for n in names), default=0.0)

        report["auc"] = test_auc
        report["val_auc"] = val_auc
        report["worst_dauc"] = {e: {"seen": worst(e, seen_names, test_auc),
                                    "unseen": worst(e, [d.name for d in unseen], test_auc),
                                    "val": worst(e, seen_names, val_auc)} for e in fns}
        statics = [e for e in fns if e.startswith("ort-int8-static-")]
        # the loop's int8 challenger (export.int8_calibration); the best on seen validation beside it
        best_on_val = min(statics, key=lambda e: report["worst_dauc"][e]["val"]) if statics else None
        configured = f"ort-int8-static-{params.export.int8_calibration}"
        kept = configured if configured in statics else best_on_val
        report["static_kept"], report["static_best_on_val"] = kept, best_on_val
        timed = {e: fns[e] for e in ("torch-eager", "ort-fp32", "ort-int8-dynamic", *statics)}
        pool = np.concatenate([x for x, _, _ in test.values()])
        report["timing"] = {}
        for batch in BATCHES:
            x = pool[np.arange(batch) % len(pool)]
            t = time.perf_counter()
            report["timing"][batch] = time_engines(timed, x, args.seconds)
            seconds[f"time batch {batch}"] = time.perf_counter() - t
            print(f"batch {batch}:", json.dumps(report["timing"][batch]), flush=True)
        def ratio(batch: int, engine: str, base: str) -> float:
            cells = report["timing"][batch]
            return cells[engine]["img_per_s"] / cells[base]["img_per_s"]

        report["ratios"] = {
            "fp32_vs_torch_b32": ratio(32, "ort-fp32", "torch-eager"), "fp32_vs_torch_b1": ratio(1, "ort-fp32", "torch-eager"),
            "int8_dynamic_vs_fp32_b32": ratio(32, "ort-int8-dynamic", "ort-fp32"),
            **({"int8_static_vs_fp32_b32": ratio(32, kept, "ort-fp32"), "int8_static_vs_fp32_b1": ratio(1, kept, "ort-fp32"),
                "int8_static_max_abs_dauc_seen": report["worst_dauc"][kept]["seen"]} if kept else {}),
        }
        if not args.no_profile:
            t = time.perf_counter()
            x = pool[np.arange(32) % len(pool)]
            report["profile"] = {e: profile(built["files"][e], x, threads, 5 if args.smoke else 20, folder)
                                 for e in ("ort-fp32", kept) if e}
            if kept:
                files = built["files"]
                report["sqnr"] = activation_sqnr(files["ort-fp32"], files[kept], built["reader"], folder)
            some = [p for _, _, paths in test.values() for p in paths][:16]
            report["preprocess_vs_inference"] = preprocess_share(some, prep, fns["ort-fp32"], x[:1])
            seconds["profile"] = time.perf_counter() - t
        if not args.no_load:
            t = time.perf_counter()
            files = [p for _, _, paths in test.values() for p in paths]
            fp32_scores = score_all({"f": fns["ort-fp32"]}, test, batch=1)["f"]
            expected = {str(p): float(s) for (_, _, paths), scores in zip(test.values(), fp32_scores.values())
                        for p, s in zip(paths, scores)}
            uploads = [(str(p), Path(p).read_bytes()) for p in files]
            report["load"] = [load_test(champion["onnx"], params, folder, args.clients, args.requests, threads, uploads,
                                        expected, batching, args.server_python) for batching in (False, True)]
            report["server_python"] = args.server_python  # as given: a venv's python is a link
            off, on = report["load"]
            report["ratios"]["http_batching_vs_off"] = on["req_per_s"] / off["req_per_s"]
            report["ratios"]["http_p99_batching_vs_off"] = on["p99_ms"] / off["p99_ms"]
            seconds["http load"] = time.perf_counter() - t
        report["calibration_images"] = built["calibration_images"]
        report["files_mb"] = {e: Path(p).stat().st_size / 2**20 for e, p in built["files"].items()}
    seconds["total"] = time.perf_counter() - started
    report["seconds"] = seconds
    report["model"] = {"source": champion["source"], "onnx": _relative(champion["onnx"], params.root),
                       "checkpoint": _relative(champion["checkpoint"], params.root),
                       "model_version": champion.get("model_version"),
                       "data_root": _relative(params.path("data_root"), params.root)}
    out.parent.mkdir(parents=True, exist_ok=True)
    from r2m.fileio import atomic_write_json, atomic_write_text

    atomic_write_json(out.with_suffix(".json"), report, sort_keys=False)
    text = markdown(report)
    atomic_write_text(out.with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    main()
