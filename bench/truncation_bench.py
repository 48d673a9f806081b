"""Microbenchmark: the exact rank-k truncation W -> W_k of one matrix, every candidate method against
the dense float64 SVD reference. Short by design (a few seconds per row, 1-2 threads):

    .venv/bin/python bench/truncation_bench.py [--threads 2] [--shapes 1024x1024 4096x1024] [--reps 3]

Candidates (each returns the projected matrix W̃ and is timed end to end, projection included):

- gram64-eigh64:  float64 Gram WᵀW, torch.linalg.eigh (syevd), projection with the complement
                  basis when k > p/2 (what main does);
- gram32-eigh64:  Gram formed in float32, eigendecomposed in float64;
- gram32-eigh32:  everything in float32;
- evr64-subset:   float64 Gram, scipy LAPACK ?syevr computing only the k (or p-k) eigenvectors needed;
- evr32-subset:   the same in float32;
- svd32:          torch.linalg.svd of W in float32 (CPU: gesdd), U_k Σ_k V_kᵀ;
- svd64:          the same in float64;
- certified:      what r2m ships (r2m.merging.linalg.eigenbases): float32 Gram, float32 eigh, kept
                  where the eigenvalue error bound certifies the rank, else eigh again in float64;
- eigvalsh64:     eigenvalues only (no vectors, no projection): a lower bound for any
                  "eigvalsh + projector" method, which needs at least this plus a projector.

Accuracy per candidate: ‖W − W̃‖_F / ‖W − W_k‖_F − 1 (0 = the best rank-k approximation; the
Eckart–Young optimum from the float64 SVD) and rank(W̃) ≤ k. Inputs (`--inputs`): `residual` looks
like the benchmark's task-vector residuals, a low-rank part plus dense noise (a flat tail of
singular values); `floor` is a few large singular values over a noise floor 500× smaller, the
spectrum float32 cannot resolve (where `certified` falls back to float64). Results: bench/results/truncation_bench.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _threads(n: int) -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)


def residual_like(m: int, n: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    low = torch.randn(m, 8, generator=g) @ torch.randn(8, n, generator=g)
    return (1e-4 * low + 2e-4 * torch.randn(m, n, generator=g)).contiguous()


def floor_like(m: int, n: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    p = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, p, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, p, generator=g, dtype=torch.float64))
    sigma = torch.cat([torch.tensor([50.0, 30, 20, 10], dtype=torch.float64), 0.1 * torch.rand(p - 4, generator=g, dtype=torch.float64) + 0.05])
    return ((u * sigma) @ v.T).float().contiguous()


INPUTS = {"residual": residual_like, "floor": floor_like}


def candidates():
    import numpy as np
    import scipy.linalg
    import torch

    def project(w, vecs, k, dtype=torch.float32):
        """vecs: eigenvectors in ascending eigenvalue order (p×p or the needed subset)."""
        p = w.shape[1]
        if k <= p - k:
            b = vecs[:, p - k :].to(dtype).contiguous()
            return (w @ b) @ b.T
        c = vecs[:, : p - k].to(dtype).contiguous()
        return w - (w @ c) @ c.T

    def gram64_eigh64(w, k):
        w64 = w.double()
        _, v = torch.linalg.eigh(w64.T @ w64)
        return project(w, v, k)

    def gram32_eigh64(w, k):
        _, v = torch.linalg.eigh((w.T @ w).double())
        return project(w, v, k)

    def gram32_eigh32(w, k):
        _, v = torch.linalg.eigh(w.T @ w)
        return project(w, v, k)

    def evr(w, k, dtype):
        p = w.shape[1]
        gm = (w.double().T @ w.double()) if dtype == np.float64 else (w.T @ w)
        sub = (p - k, p - 1) if k <= p - k else (0, p - k - 1)
        _, v = scipy.linalg.eigh(gm.numpy().astype(dtype, copy=False), subset_by_index=sub, driver="evr", overwrite_a=True, check_finite=False)
        v = torch.from_numpy(np.ascontiguousarray(v)).float()
        if k <= p - k:
            return (w @ v) @ v.T
        return w - (w @ v) @ v.T

    def svd(w, k, dtype):
        u, s, vh = torch.linalg.svd(w.to(dtype), full_matrices=False)
        return ((u[:, :k] * s[:k]) @ vh[:k]).float()

    def eigvalsh64(w, k):
        w64 = w.double()
        torch.linalg.eigvalsh(w64.T @ w64)
        return None

    def shipped(w, k):
        from r2m.merging.linalg import eigenbases

        _, bases = eigenbases(w[None], [k])
        return bases.project(w, 0, k)

    return {
        "certified": shipped,
        "gram64-eigh64": gram64_eigh64,
        "gram32-eigh64": gram32_eigh64,
        "gram32-eigh32": gram32_eigh32,
        "evr64-subset": lambda w, k: evr(w, k, np.float64),
        "evr32-subset": lambda w, k: evr(w, k, np.float32),
        "svd32": lambda w, k: svd(w, k, torch.float32),
        "svd64": lambda w, k: svd(w, k, torch.float64),
        "eigvalsh64": eigvalsh64,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", nargs="+", default=["1024x1024", "4096x1024"])
    ap.add_argument("--ranks", type=float, nargs="+", default=[0.1, 0.7])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--inputs", nargs="+", default=["residual"], choices=list(INPUTS))
    ap.add_argument("--only", nargs="*", default=None, help="candidate names to run (default: all)")
    ap.add_argument("--out", default=str(HERE / "results" / "truncation_bench.md"))
    args = ap.parse_args()
    _threads(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    cands = candidates()
    names = args.only or list(cands)
    rows = []
    for kind, shape in ((kind, shape) for kind in args.inputs for shape in args.shapes):
        m, n = (int(x) for x in shape.split("x"))
        w = INPUTS[kind](m, n, seed=m + n)
        sigma = torch.linalg.svdvals(w.double())
        for r in args.ranks:
            k = max(1, int(r * min(m, n) + 1e-9))
            best = float(sigma[k:].square().sum().sqrt())
            for name in names:
                fn = cands[name]
                fn(w, k)  # warm-up
                times, cpu = [], []
                for _ in range(args.reps):
                    t, c = time.perf_counter(), time.process_time()
                    out = fn(w, k)
                    times.append(time.perf_counter() - t)
                    cpu.append(time.process_time() - c)
                # CPU seconds (all threads) are robust to other jobs on a shared machine; wall seconds are what a merge waits
                row = {"input": kind, "shape": shape, "r": r, "k": k, "method": name, "seconds_min": min(times), "seconds_median": sorted(times)[len(times) // 2], "cpu_seconds_min": min(cpu)}
                if out is not None:
                    err = float((w.double() - out.double()).norm())
                    row["excess"] = err / best - 1.0
                    row["rank_ok"] = bool(torch.linalg.matrix_rank(out.double(), rtol=1e-4) <= k)
                rows.append(row)
                print(json.dumps(row), flush=True)
    ref = {(r["input"], r["shape"], r["r"]): r["seconds_min"] for r in rows if r["method"] == "gram64-eigh64"}
    lines = [
        f"# Truncation microbenchmark (`bench/truncation_bench.py`), {args.threads} threads, CPU ({os.cpu_count()} cores visible)",
        "",
        "Seconds are the minimum of the repetitions; speed-up is against gram64-eigh64 (main's method) on the same",
        "matrix; excess = ‖W − W̃‖_F / ‖W − W_k‖_F − 1 against the float64 SVD optimum (0 = exact).",
        "",
        "| input | shape | r (k) | method | s (min) | s (median) | CPU s (min) | speed-up | excess | rank ≤ k |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        base = ref.get((row["input"], row["shape"], row["r"]))
        speed = f"{base / row['seconds_min']:.2f}×" if base else ""
        excess = f"{row['excess']:.1e}" if "excess" in row else "(no vectors)"
        rank = ("yes" if row["rank_ok"] else "NO") if "rank_ok" in row else ""
        lines.append(f"| {row['input']} | {row['shape']} | {row['r']} ({row['k']}) | {row['method']} | {row['seconds_min']:.3f} | {row['seconds_median']:.3f} | {row['cpu_seconds_min']:.3f} | {speed} | {excess} | {rank} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
