"""Merging at ViT-L/14 scale: wall time and peak RSS of every method, against the I/O floor and
the SVD time measured in the same run (issues 4, 14). Not a test: run it by hand.

    .venv/bin/python bench/merge_bench.py [--model ViT-L-14] [--n 3 6] [--threads 2] [--layers L]

Issue 14's run (ViT-L/14, N = 6, 2 threads; one R²M merge, the 24-point selection, WA, I/O, CART):

    .venv/bin/python bench/merge_bench.py --n 6 --modes io iow wa r2m grid cart --out bench/results/merge_bench_issue14.md

`--layers L` keeps only the first L transformer blocks (a smoke run of seconds: `--layers 1`).

θ0 is open_clip's visual tower with random init (`pretrained=None`, no download, `proj` removed as
in the detector); specialists are θ0 + synthetic task vectors (a shared low-rank direction with
per-specialist weight, a specialist-specific low-rank part, and dense noise), written as
safetensors to a temporary folder that is deleted at the end. Every measurement runs in a fresh
subprocess which reports its own wall time and peak RSS (getrusage of itself):

- io:   read every tensor of θ0 and the N specialists, nothing else (the I/O floor);
- svd:  the layerwise truncations alone (Gram + eigh + projection), inputs read untimed;
- wa, ta, ties, cart, r2m: the streamed merge, files in, safetensors file out;
- grid: the R²M selection's merge work without the scoring: α {0.4, 0.5, 0.6} × r {0.1, 0.3, 0.5,
  0.7} × core {centered, uncentered} = 24 points from one analysis, each written to its own
  safetensors file (deleted after it is written), scratch on disk;
- hier: hierarchical R²M (docs/method.md) with the specialists in groups of two (N = 6: three
  pairs, each pair's mean a group model on disk, then R²M over the three), streamed to a file;
- select, select-hier: the loop's selection as `r2m run` takes it (`r2m.merging.select`, flat or
  hierarchical): the 12 points α {0.4, 0.5, 0.6} × r {0.005, 0.01, 0.03, 0.1}, each composed in
  memory and read by a stand-in scorer, one point in memory at a time.

Prints a markdown table plus the issue's ratios and writes them to bench/results/merge_bench.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHOD_ARGS = {
    "wa": {},
    "ta": {"lam": 0.5},
    "ties": {"top_p": 0.2},
    "cart": {"eta": 1.0, "rank": 0.1},
    "r2m": {"alpha": 0.5, "rank": 0.7},
}


def _threads(n: int) -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)


# -- synthetic checkpoints -------------------------------------------------------------------------

def make_checkpoints(model: str, n: int, folder: Path, seed: int = 0, layers: int | None = None) -> None:
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    visual = open_clip.create_model(model, pretrained=None).visual
    visual.proj = None
    if layers is not None:  # reduced model for smoke runs: the first `layers` blocks only
        visual.transformer.resblocks = visual.transformer.resblocks[:layers]
    theta0 = {f"backbone.{k}": v.detach().contiguous() for k, v in visual.state_dict().items()}
    del visual
    save_file(theta0, str(folder / "theta0.safetensors"))
    width = theta0["backbone.ln_pre.weight"].shape[0]
    g = torch.Generator().manual_seed(seed + 1)
    shared = {}
    for k, v in theta0.items():  # one shared rank-4 direction per matrix: the "Real" part
        if v.ndim == 2:
            shared[k] = (torch.randn(v.shape[0], 4, generator=g), torch.randn(4, v.shape[1], generator=g))
    for i in range(n):
        weight = 1.0 + 0.5 * i / max(n - 1, 1)
        spec = {}
        for k, v in theta0.items():
            noise = 2e-4 * torch.randn(v.shape, generator=g)
            if v.ndim == 2:
                a, b = shared[k]
                own = torch.randn(v.shape[0], 8, generator=g) @ torch.randn(8, v.shape[1], generator=g)
                noise += 1e-4 * weight * (a @ b) + 1e-4 * own
            spec[k] = (v + noise).contiguous()
        spec["head.weight"] = 0.01 * torch.randn(2, width, generator=g)
        spec["head.bias"] = torch.zeros(2)
        save_file(spec, str(folder / f"spec{i}.safetensors"))
        del spec


# -- children --------------------------------------------------------------------------------------

class _AnonPeak:
    """The peak of this process's private anonymous memory (RssAnon, sampled every 20 ms): what
    it really holds. VmHWM also counts pages of files it reads through mmap (safetensors), which
    the kernel can drop at any time."""

    def __init__(self):
        import threading

        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                self.peak = max(self.peak, int(line.split()[1]))

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._sample()

    def gb(self) -> float:
        self._stop.set()
        self._thread.join()
        self._sample()
        return self.peak / 1024**2


def child(mode: str, folder: Path, n: int, threads: int, extra: dict) -> dict:
    _threads(threads)
    anon = _AnonPeak()
    import torch

    from r2m.merging import METHODS, DiskScratch, Runtime, SafetensorsSink, SafetensorsSource, TaskVectors
    from r2m.merging.linalg import truncate_blocks
    from r2m.merging.taskvectors import centred, task_vectors

    paths = [folder / "theta0.safetensors"] + [folder / f"spec{i}.safetensors" for i in range(n)]
    start = time.perf_counter()
    sources = [SafetensorsSource(p) for p in paths]
    info: dict = {}
    if mode == "io":
        nbytes = 0
        for s in sources:
            for k in s.keys():
                nbytes += s.get(k).numel()
        info["elements"] = nbytes
    elif mode == "iow":  # the floor plus writing one model-sized safetensors file (what every merge must do)
        tv = TaskVectors(sources[0], sources[1:])
        out = folder / "out-iow.safetensors"
        sink = SafetensorsSink(out, tv.layout())
        for s in sources[2:]:
            for k in s.keys():
                s.get(k)
        for k, _, _ in tv.layout():
            sink.put(k, sources[1].get(k))
        sink.close()
        out.unlink()
    elif mode == "svd":
        tv = TaskVectors(sources[0], sources[1:], Runtime(device="cpu"))
        svd = 0.0
        for p, theta0, stack in tv.stream():
            if p.blocks:
                delta = centred(task_vectors(theta0, stack))
                t = time.perf_counter()
                truncate_blocks(delta, p.matrix_shape, p.blocks, extra.get("rank", 0.7), torch.device("cpu"))
                svd += time.perf_counter() - t
        info["svd_only_seconds"] = svd
    elif mode == "grid":
        from r2m.merging.r2m import r2m_points

        scratch = DiskScratch(folder)
        tv = TaskVectors(sources[0], sources[1:], Runtime(device="cpu", scratch=scratch))
        points = [METHODS["r2m"].resolve(p) for p in METHODS["r2m"].grid({"core": ("centered", "uncentered")})]
        out = folder / "out-grid.safetensors"
        times, last, chosen, sinks = [], time.perf_counter(), {}, []

        def sink_for(hp):
            sinks.append(SafetensorsSink(out, tv.layout()))
            return sinks[-1]

        for hp, result in r2m_points(tv, points, sinks=sink_for):
            sinks[-1].close()  # the finished file, as a scorer would load it
            chosen.setdefault("first_point_seconds", time.perf_counter() - start)
            times.append(time.perf_counter() - last)
            last = time.perf_counter()
            out.unlink(missing_ok=True)
            chosen[str(hp)] = result.diagnostics["eta"]
        scratch.close()
        d = result.diagnostics
        info.update({"points": len(times), "svd_seconds": d["svd_seconds"], "projection_seconds": d["projection_seconds"],
                     "seconds_per_point_after_first": sum(times[1:]) / max(len(times) - 1, 1), "first_point_seconds": chosen.pop("first_point_seconds"), "eta": chosen})
    elif mode in ("select", "select-hier"):  # the loop's selection: each point composed in memory and scored
        from r2m.merging import select

        grid = {"alpha": (0.4, 0.5, 0.6), "rank": (0.005, 0.01, 0.03, 0.1)}
        hierarchy = None
        if mode == "select-hier":
            from r2m.merging.hierarchy import Grouping

            hierarchy = {"grouping": Grouping.of([str(i // 2) for i in range(n)]), "folder": folder}
        seen_points = []

        def score(state, hp):  # stands in for the validation scorer: reads every tensor once
            seen_points.append(sum(float(t.float().sum()) for t in state.values() if t.is_floating_point()))
            return -abs(hp["alpha"] - 0.5) - abs(hp["rank"] - 0.03)

        chosen = select("r2m", sources[0], sources[1:], score, grid=grid, fixed={"core": "uncentered"},
                        runtime=Runtime(device="cpu"), hierarchy=hierarchy)
        info.update({"points": len(seen_points), "best": chosen.best_hparams})
    elif mode == "hier":  # hierarchical R²M, groups of two (N = 6: three pairs), streamed to a file
        from r2m.merging.hierarchy import Grouping

        spec = METHODS["r2m"]
        tv = TaskVectors(sources[0], sources[1:])
        out = folder / "out-hier.safetensors"
        sink = SafetensorsSink(out, tv.layout())
        scratch = DiskScratch(folder)
        hierarchy = {"grouping": Grouping.of([str(i // 2) for i in range(n)]), "folder": folder}
        ((_, result),) = list(spec.run_points(sources[0], sources[1:], [spec.resolve(extra)],
                                              Runtime(device="cpu", sink=sink, scratch=scratch), hierarchy))
        sink.close()
        scratch.close()
        out.unlink()
        info["diagnostics"] = result.diagnostics
    else:
        spec = METHODS[mode]
        tv = TaskVectors(sources[0], sources[1:])
        out = folder / f"out-{mode}.safetensors"
        sink = SafetensorsSink(out, tv.layout())
        scratch = DiskScratch(folder) if mode == "r2m" else None
        result = spec.fn(sources[0], sources[1:], runtime=Runtime(device="cpu", sink=sink, scratch=scratch), **spec.resolve(extra))
        sink.close()
        if scratch is not None:
            scratch.close()
        out.unlink()
        info["diagnostics"] = result.diagnostics
    info["seconds"] = time.perf_counter() - start
    info["max_rss_gb"] = _peak_rss_gb()
    info["max_anon_gb"] = anon.gb()
    return info


def _peak_rss_gb() -> float:
    """This process's own peak RSS (VmHWM). getrusage's ru_maxrss would also count the parent's RSS
    at fork time, which Linux carries over into a child's ru_maxrss across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024**2
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def measure(mode: str, folder: Path, n: int, threads: int, extra: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--dir", str(folder), "--n", str(n), "--threads", str(threads), "--extra", json.dumps(extra or {})]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode:
        raise SystemExit(f"child {mode} N={n} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- report ----------------------------------------------------------------------------------------

BEFORE_R2M_N6 = 285.8  # s: one R²M merge, ViT-L/14, N = 6, 2 threads, main before the certified truncation (merge_bench.md)


def report(model: str, rows: dict, threads: int, total_params: int, full: bool = True) -> str:
    lines = [
        f"# Merge benchmark: {model} visual tower ({total_params / 1e6:.0f} M parameters, fp32), {threads} threads, CPU",
        "",
        f"Machine: {os.cpu_count()} cores visible; every cell is one fresh subprocess (wall s / its own peak RSS = VmHWM, GB).",
        "",
        "| N | I/O floor | floor + write | SVDs | WA | TA | TIES | CART | R²M | R²M 24-point selection (merge work) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    checks = []
    extra_rows: list[str] = []
    na = "–"
    for n, r in rows.items():
        def cell(m: str, anon: bool = False) -> str:
            if m not in r:
                return na
            private = f" ({r[m]['max_anon_gb']:.2f} GB anon)" if anon else ""
            return f"{r[m]['seconds']:.1f} s / {r[m]['max_rss_gb']:.2f} GB{private}"

        in_run = r.get("r2m", {}).get("diagnostics", {}).get("svd_seconds")
        svd = " / ".join(x for x in (f"{r['svd']['svd_only_seconds']:.1f} s alone" if "svd" in r else "", f"{in_run:.1f} s in R²M" if in_run else "") if x) or na
        lines.append(f"| {n} | {cell('io')} | {cell('iow')} | {svd} | " + " | ".join(cell(m) for m in (*METHOD_ARGS, "grid")) + " |")
        if any(m in r for m in ("hier", "select", "select-hier")):
            extra_rows.append("| " + " | ".join([str(n), *(cell(m, anon=True) for m in ("r2m", "hier", "select", "select-hier"))]) + " |")
        wa = r.get("wa", {}).get("seconds")
        target = 1.2 if n == max(rows) else None
        if "r2m" in r and wa:
            checks.append((n, "R²M / (SVD in the same R²M run + WA)", r["r2m"]["seconds"] / (in_run + wa), target))
            checks.append((n, "R²M peak RSS (GB)", r["r2m"]["max_rss_gb"], 4.0))
        if "svd" in r and "r2m" in r and wa:
            checks.append((n, "R²M / (SVDs alone, own subprocess + WA)", r["r2m"]["seconds"] / (r["svd"]["svd_only_seconds"] + wa), target))
        if "ties" in r and wa:
            checks.append((n, "TIES / WA", r["ties"]["seconds"] / wa, 5.0))
        if wa and "io" in r:
            checks.append((n, "WA / I/O floor", wa / r["io"]["seconds"], 1.5))
        if wa and "iow" in r:
            checks.append((n, "WA / (I/O floor + writing the output)", wa / r["iow"]["seconds"], None))
        if "cart" in r and wa:
            checks.append((n, "CART / (its SVD + WA)", r["cart"]["seconds"] / (r["cart"]["diagnostics"]["svd_seconds"] + wa), None))
        # targets of the certified-truncation work (ViT-L/14, N = 6)
        if "grid" in r and "r2m" in r and wa:
            checks.append((n, "24-point selection / (one R²M merge + 24 WA)", r["grid"]["seconds"] / (r["r2m"]["seconds"] + 24 * wa), 1.0))
            checks.append((n, "selection: each point after the first / WA", r["grid"]["seconds_per_point_after_first"] / wa, 1.0))
        if "r2m" in r and n == 6 and full:
            checks.append((n, f"one R²M merge / main before the certified truncation ({BEFORE_R2M_N6} s)", r["r2m"]["seconds"] / BEFORE_R2M_N6, 0.5))
        if "select" in r and "r2m" in r:
            checks.append((n, "the loop's 12-point selection, peak RSS / one R²M merge's", r["select"]["max_rss_gb"] / r["r2m"]["max_rss_gb"], 2.0))
            checks.append((n, "the same, private (anonymous) memory", r["select"]["max_anon_gb"] / r["r2m"]["max_anon_gb"], 2.0))
        if "select-hier" in r and "r2m" in r:
            checks.append((n, "hierarchical selection, peak RSS / one flat R²M merge's", r["select-hier"]["max_rss_gb"] / r["r2m"]["max_rss_gb"], 2.0))
            checks.append((n, "the same, private (anonymous) memory", r["select-hier"]["max_anon_gb"] / r["r2m"]["max_anon_gb"], 2.0))
        if "hier" in r and "r2m" in r:
            checks.append((n, "hierarchical R²M / flat R²M, time", r["hier"]["seconds"] / r["r2m"]["seconds"], None))
            checks.append((n, "hierarchical R²M / flat R²M, peak RSS", r["hier"]["max_rss_gb"] / r["r2m"]["max_rss_gb"], None))
        peak = max((c["max_rss_gb"] for c in r.values()), default=0.0)
        checks.append((n, "peak RSS of any cell (GB)", peak, 4.0))
    if extra_rows:
        lines += ["", "| N | flat R²M (r = 0.7) | hierarchical R²M (pairs) | the loop's selection, flat | the loop's selection, hierarchical |",
                  "|---|---|---|---|---|", *extra_rows]
    lines += ["", "| N | ratio | measured | target | met |", "|---|---|---|---|---|"]
    for n, name, value, target in checks:
        ok = "" if target is None else ("yes" if value <= target else "NO")
        lines.append(f"| {n} | {name} | {value:.2f} | {'' if target is None else f'≤ {target}'} | {ok} |")
    lines += ["", "R²M diagnostics (centred core = eq. 2, the default; uncentred = SVD of M, `core=uncentered`):", ""]
    lines += ["| N | reading | singular values | ‖τ_core‖/‖τ̄‖ | cos(v, τ̄) | ‖τ̄‖ | ‖τ_res‖ | η |", "|---|---|---|---|---|---|---|---|"]
    for n, r in rows.items():
        if "r2m" not in r:
            continue
        d = r["r2m"]["diagnostics"]
        sv = ", ".join(f"{s:.3g}" for s in d["singular_values"])
        lines.append(f"| {n} | centred | {sv} | {d['core_ratio']:.3f} | {d['cos_v_tau_bar']:.3f} | {d['tau_bar_norm']:.3g} | {d['residual_norm']:.3g} | {d['eta']:.3g} |")
        o = d["other_core"]
        sv = ", ".join(f"{s:.3g}" for s in o["singular_values"])
        lines.append(f"| {n} | uncentred | {sv} | {o['core_ratio']:.3f} | {o['cos_v_tau_bar']:.3f} | | | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ViT-L-14")
    ap.add_argument("--n", type=int, nargs="+", default=[3, 6])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="where the synthetic checkpoints go (default: a temp dir)")
    ap.add_argument("--out", default=str(HERE / "results" / "merge_bench.md"))
    ap.add_argument("--modes", nargs="+", default=["io", "iow", "wa", "r2m", "ties", "ta", "cart", "svd"], help="what to measure")
    ap.add_argument("--layers", type=int, default=None, help="keep only the first L transformer blocks (smoke runs)")
    ap.add_argument("--reuse", default=None, help="a folder with checkpoints from an earlier run (kept afterwards)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--extra", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.dir), args.n[0], args.threads, json.loads(args.extra))))
        return
    _threads(args.threads)
    folder = Path(args.reuse) if args.reuse else Path(tempfile.mkdtemp(prefix="r2m-merge-bench-", dir=args.workdir))
    rows: dict[int, dict] = {}
    try:
        t = time.perf_counter()
        if not args.reuse:
            make_checkpoints(args.model, max(args.n), folder, layers=args.layers)
        from r2m.merging import SafetensorsSource

        src = SafetensorsSource(folder / "theta0.safetensors")
        total = sum(int(__import__("math").prod(src.shape(k))) for k in src.keys())
        full = args.model == "ViT-L-14" and args.layers is None
        label = args.model + (f" ({args.layers} blocks)" if args.layers is not None else "")
        print(f"checkpoints written in {time.perf_counter() - t:.0f} s to {folder}", flush=True)
        for n in sorted(args.n, reverse=True):  # N = 6 first: the targets are stated for it
            r: dict = {}
            rows[n] = r
            for mode in args.modes:
                extra = METHOD_ARGS.get(mode, {"rank": METHOD_ARGS["r2m"]["rank"]})
                r[mode] = measure(mode, folder, n, args.threads, extra)
                print(f"N={n} {mode}: {r[mode]['seconds']:.1f} s, {r[mode]['max_rss_gb']:.2f} GB", flush=True)
                _write(args.out, report(label, rows, args.threads, total, full), rows)
    finally:
        if not args.reuse:
            shutil.rmtree(folder, ignore_errors=True)
    text = report(label, rows, args.threads, total, full)
    _write(args.out, text, rows)
    print(text)


def _write(out: str, text: str, rows: dict) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text)
    Path(out).with_suffix(".json").write_text(json.dumps({str(k): v for k, v in rows.items()}, indent=1, default=str))


if __name__ == "__main__":
    main()
