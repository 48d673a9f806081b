"""R²M, Real-aware Residual Model Merging (paper §3.1, eqs. 1-6), as docs/method.md writes it down.

    τ_i = θ_i − θ0,  τ̄ = (1/N) Σ_i τ_i,  M_c = M − 1 τ̄ᵀ = U_c Σ_c V_cᵀ          (eqs. 1-2)
    τ_core = V_{c,k} V_{c,k}ᵀ τ̄                                                  (eq. 3)
    δ_i = τ_i − τ̄,  δ̃_i = SVD_r(δ_i) on attention/MLP matrices (Q, K, V split)   (A.5)
    m = (1/N) Σ_i ‖δ̃_i‖,  δ̂_i = m δ̃_i / (‖δ̃_i‖ + ε)                              (eq. 4)
    τ_res = (1/N) Σ_i δ̂_i                                                        (eq. 5)
    η = α ‖τ_core‖ / ‖τ_res‖  (§4 tuning protocol; eq. 6 literal: η = α ‖τ_core‖)
    θ* = θ0 + τ_core + η τ_res                                                   (eq. 6)

Nothing D-dimensional beyond one tensor is held in memory. V_{c,k} = M_cᵀ U_k Σ_k⁻¹, so
τ_core = Σ_i a_i τ_i with coefficients from the N×N Gram matrix G = M Mᵀ alone
(M_c M_cᵀ = C G C, M_c τ̄ = C G 1/N, C = I − 11ᵀ/N); τ_res = Σ_i w_i δ̃_i with
w_i = m / (N (‖δ̃_i‖ + ε)), where ‖δ̃_i‖² is the sum of the top-k eigenvalues of each block's Gram.

One analysis serves a whole grid of (α, r, core, k) points (docs/method.md, "R²M", decision 7):

1. `analyse` (reads the inputs once): G, and per (specialist, matrix block) ONE Gram eigendecomposition
   whose bases serve every rank r of the grid (top-k subspaces are nested); the per-rank norms
   ‖δ̃_i‖ come from the eigenvalues. Bases go to the scratch.
2. `build` (reads the inputs once more, replays the bases): per core reading (and k) the base
   θ0 + τ_core, per rank the residual τ_res = Σ_i w_i δ̃_i and its norm; each goes to its own
   scratch, key by key (disk when the runtime's scratch is a `DiskScratch`).
3. `compose` (per point, reads no input): θ* = (θ0 + τ_core) + η τ_res from the two scratches.

A single merge is the same three steps for one point, so a grid point is bitwise the single merge.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterator, Literal, Sequence

import torch

from r2m.errors import MergeError
from r2m.merging.linalg import N_TENSORS, Eigenbases, block_view, eigenbases, gram, top_singular, truncation_rank
from r2m.merging.stream import Scratch, Sink
from r2m.merging.taskvectors import MergeResult, Runtime, TaskVectors, TensorPlan, centred, task_vectors
from r2m.merging.wa import average

EPS = 1e-8  # ε of eq. 4
CORES = ("centered", "uncentered")
ETA_MODES = ("normalized", "literal")


def _check_rank(rank: float) -> None:
    if not 0 < rank <= 1:
        raise MergeError(f"R²M: rank ratio r must be in (0, 1], got {rank}")


def check_point(hp: dict) -> None:
    """Reject a bad (α, r, k, core, η mode) before any input is read."""
    if hp.get("core", "centered") not in CORES:
        raise MergeError(f"R²M: core must be 'centered' or 'uncentered', got {hp['core']!r}")
    _check_rank(hp.get("rank", 0.7))
    if hp.get("k", 1) < 1:
        raise MergeError(f"R²M: k must be at least 1, got {hp['k']}")
    if hp.get("eta_mode", "normalized") not in ETA_MODES:
        raise MergeError(f"R²M: eta mode must be 'normalized' or 'literal', got {hp['eta_mode']!r}")


# -- pass 1: one eigendecomposition per (specialist, block) for every rank ----------------------

@dataclass
class Analysis:
    """What pass 1 leaves: G = M Mᵀ, ‖δ̃_i‖² per rank (float64) and the bases (in `bases`)."""

    ranks: tuple[float, ...]
    rtol: float
    g: torch.Tensor
    res_sq: dict[float, torch.Tensor]
    svd_seconds: float
    bases: Scratch


def _block_ranks(sub: tuple[int, int], ranks: Sequence[float]) -> dict[float, int]:
    return {r: truncation_rank(sub, r) for r in ranks}


def analyse(tv: TaskVectors, *, ranks: Sequence[float] = (0.7,), rtol: float = 1e-5) -> Analysis:
    """Pass 1: G, and per matrix block one Gram eigendecomposition (linalg.eigenbases) for all `ranks`."""
    ranks = tuple(sorted(set(ranks)))
    for r in ranks:
        _check_rank(r)
    g = torch.zeros((tv.n, tv.n), dtype=torch.float64)
    res_sq = {r: torch.zeros(tv.n, dtype=torch.float64) for r in ranks}
    bases = tv.new_scratch()  # closed by `build` (or by the caller on a degenerate input)
    device = tv.runtime.resolved_device()
    try:
        svd_seconds = _analyse_keys(tv, ranks, g, res_sq, bases, device)
    except BaseException:
        bases.close()  # a failed analysis leaves no scratch behind
        raise
    return Analysis(ranks, rtol, g, res_sq, svd_seconds, bases)


def _analyse_keys(tv: TaskVectors, ranks: tuple[float, ...], g: torch.Tensor, res_sq: dict, bases: Scratch, device: torch.device) -> float:
    n = tv.n
    svd_seconds = 0.0
    for p, theta0, stack in tv.stream(desc="r2m: analyse"):
        tau = task_vectors(theta0, stack)
        g_key = gram(tau)
        tv.require_finite(p.key, g_key)
        g += g_key
        delta = centred(tau)  # in place: τ is not needed any more
        if not p.blocks:
            full = gram(delta).diagonal()
            for r in ranks:
                res_sq[r] += full
            continue
        shape = p.matrix_shape
        sub = (shape[0] // p.blocks, shape[1])
        ks = _block_ranks(sub, ranks)
        truncated = sorted({k for k in ks.values() if k < min(sub)})
        parts = block_view(delta, shape, p.blocks).to(device)
        stored: list[torch.Tensor] = []
        start = time.perf_counter()
        for b in range(p.blocks):
            block = parts[:, b]
            if truncated:
                kept, eb = eigenbases(block, truncated)
                stored += eb.tensors()
            for r, k in ks.items():
                if k < min(sub):
                    res_sq[r] += kept[k]
                else:
                    res_sq[r] += gram(block.reshape(n, -1).cpu()).diagonal()
        svd_seconds += time.perf_counter() - start
        bases.append(stored)
    return svd_seconds


# -- N×N algebra ---------------------------------------------------------------------------------

def _core(g: torch.Tensor, centered: bool, k: int, rtol: float) -> dict:
    """τ_core = V_k V_kᵀ τ̄ as coefficients on the τ_i, from the Gram matrix alone (eqs. 2-3)."""
    n = g.shape[0]
    ones = torch.ones(n, dtype=torch.float64) / n
    c = torch.eye(n, dtype=torch.float64) - 1.0 / n if centered else torch.eye(n, dtype=torch.float64)
    gm = c @ g @ c  # M_c M_cᵀ (or M Mᵀ)
    b = c @ g @ ones  # M_c τ̄ (or M τ̄)
    scale = math.sqrt(max(float(g.trace()), 0.0))  # ‖M‖_F: singular values are judged relative to it
    sigma, u, sig_k = top_singular(gm, k, scale, rtol)
    tau_bar_sq = float(ones @ g @ ones)
    coeff = u @ ((u.T @ b) / sig_k**2) if sig_k.numel() else torch.zeros(n, dtype=torch.float64)
    core_sq = float(coeff @ gm @ coeff)
    cos_v = float((u[:, 0] @ b).abs() / (sig_k[0] * math.sqrt(tau_bar_sq))) if sig_k.numel() and tau_bar_sq > 0 else 0.0
    return {
        "a": c @ coeff,  # rows of M_c are C·M: coefficients on the τ_i
        "singular_values": [float(s) for s in sigma],
        "rank_used": int(sig_k.numel()),
        "core_norm": math.sqrt(max(core_sq, 0.0)),
        "tau_bar_norm": math.sqrt(max(tau_bar_sq, 0.0)),
        "cos_v_tau_bar": cos_v,
    }


def residual_weights(res_sq: torch.Tensor) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Eqs. 4-5: (‖δ̃_i‖, m, w) with τ_res = Σ_i w_i δ̃_i."""
    norms = res_sq.clamp_min(0).sqrt()
    m = float(norms.mean())
    return norms, m, m / (norms.shape[0] * (norms + EPS))


def degenerate(g: torch.Tensor, n: int, rtol: float) -> str | None:
    """N = 1 or identical specialists (M_c = 0 up to the relative tolerance): R²M is WA."""
    if n == 1:
        return "single specialist"
    c = torch.eye(n, dtype=torch.float64) - 1.0 / n
    top = float(torch.linalg.eigvalsh(c @ g @ c).max().clamp_min(0).sqrt())
    if top <= rtol * math.sqrt(max(float(g.trace()), 0.0)):
        return "identical specialists"
    return None


# -- pass 2: bases θ0 + τ_core per core, residuals τ_res per rank --------------------------------

@dataclass
class Residual:
    norms: torch.Tensor  # ‖δ̃_i‖
    mean_norm: float  # m
    w: torch.Tensor  # float64 weights
    scratch: Scratch
    norm_sq: float = 0.0  # ‖τ_res‖², accumulated key by key


@dataclass
class Parts:
    """What every grid point is composed from (pass 2's output)."""

    analysis: Analysis
    cores: dict[tuple[str, int], tuple[dict, dict, Scratch]]  # (core, k) -> (this reading, the other, θ0 + τ_core)
    residuals: dict[float, Residual]
    projection_seconds: float = 0.0
    owned: list = field(default_factory=list)

    def close(self) -> None:
        for s in self.owned:
            s.close()
        self.owned.clear()


def build(tv: TaskVectors, an: Analysis, cores: Sequence[tuple[str, int]]) -> Parts:
    """Pass 2: for every (core, k) the tensors θ0 + τ_core, for every rank τ_res, to scratch."""
    device = tv.runtime.resolved_device()
    parts = Parts(an, {}, {})
    for core, k in sorted(set(cores)):
        scratch = tv.new_scratch()
        parts.owned.append(scratch)
        parts.cores[(core, k)] = (_core(an.g, core == "centered", k, an.rtol), _core(an.g, core != "centered", k, an.rtol), scratch)
    for r in an.ranks:
        norms, m, w = residual_weights(an.res_sq[r])
        scratch = tv.new_scratch()
        parts.owned.append(scratch)
        parts.residuals[r] = Residual(norms, m, w, scratch)
    try:
        _build_keys(tv, an, parts, device)
    except BaseException:
        parts.close()
        raise
    finally:
        an.bases.close()  # every point is composed from the parts alone
    return parts


def _build_keys(tv: TaskVectors, an: Analysis, parts: Parts, device: torch.device) -> None:
    a32 = {key: c[0]["a"].to(torch.float32) for key, c in parts.cores.items()}
    w32 = {r: res.w.to(torch.float32) for r, res in parts.residuals.items()}
    replay = iter(an.bases.replay())
    n = tv.n
    for p, theta0, stack in tv.stream(desc="r2m: build"):
        tau = task_vectors(theta0, stack)
        for key, (_, _, scratch) in parts.cores.items():
            scratch.append([theta0 + a32[key] @ tau])  # θ0 + τ_core
        delta = centred(tau)  # in place
        stored = next(replay) if p.blocks else []
        ebs = [Eigenbases.from_tensors(stored[j : j + N_TENSORS], device) for j in range(0, len(stored), N_TENSORS)]
        truncated = {r: delta for r in parts.residuals}  # ranks that keep the full matrix, and keys without blocks
        if p.blocks:
            shape = p.matrix_shape
            sub = (shape[0] // p.blocks, shape[1])
            ks = {r: k for r in parts.residuals if (k := truncation_rank(sub, r)) < min(sub)}
            if ks:
                start = time.perf_counter()
                blocks_in = block_view(delta, shape, p.blocks).to(device)
                outs = {r: torch.empty_like(blocks_in) for r in ks}
                for b, eb in enumerate(ebs):
                    for i in range(n):
                        projected = eb.project_ranks(blocks_in[i, b], i, list(ks.values()))  # nested ranks share their prefix
                        for r, k in ks.items():
                            outs[r][i, b] = projected[k]
                for r, out in outs.items():
                    truncated[r] = out.reshape(n, -1).cpu()
                parts.projection_seconds += time.perf_counter() - start
        for r, res in parts.residuals.items():
            value = w32[r] @ truncated[r]  # τ_res on this key
            res.norm_sq += float(gram(value[None])[0, 0])
            res.scratch.append([value])


# -- pass 3: one point --------------------------------------------------------------------------

def point_coefficients(parts: Parts, hp: dict) -> tuple[float, dict]:
    """η and the diagnostics docs/method.md lists (R²M, decision 6), for one (α, r, core, k, η mode) point."""
    an = parts.analysis
    core, other, _ = parts.cores[(hp["core"], hp["k"])]
    res = parts.residuals[hp["rank"]]
    res_norm = math.sqrt(max(res.norm_sq, 0.0))
    m = res.mean_norm
    residual_zero = m == 0.0 or res_norm <= an.rtol * m  # Σ_i δ_i = 0: τ_res may vanish (e.g. N = 2)
    if residual_zero:
        eta = 0.0
    elif hp["eta_mode"] == "normalized":
        eta = hp["alpha"] * core["core_norm"] / res_norm  # §4: η_eff = α ‖τ_core‖ / ‖τ_res‖
    else:
        eta = hp["alpha"] * core["core_norm"]  # eq. 6 as printed
    tau_bar = core["tau_bar_norm"]
    diagnostics = {
        "n_specialists": int(an.g.shape[0]),
        "core": hp["core"],
        "eta_mode": hp["eta_mode"],
        "tau_bar_norm": tau_bar,
        "core_norm": core["core_norm"],
        "core_ratio": core["core_norm"] / tau_bar if tau_bar > 0 else 0.0,
        "cos_v_tau_bar": core["cos_v_tau_bar"],
        "singular_values": core["singular_values"],
        "core_rank_used": core["rank_used"],
        "residual_norm": 0.0 if residual_zero else res_norm,
        "residual_zero": residual_zero,
        "residual_mean_norm": m,
        "residual_norms": [float(x) for x in res.norms],
        "eta": eta,
        "alpha": hp["alpha"],
        "rank": hp["rank"],
        "svd_seconds": an.svd_seconds,
        "projection_seconds": parts.projection_seconds,
        "other_core": {
            "core": "uncentered" if hp["core"] == "centered" else "centered",
            "singular_values": other["singular_values"],
            "core_ratio": other["core_norm"] / tau_bar if tau_bar > 0 else 0.0,
            "cos_v_tau_bar": other["cos_v_tau_bar"],
        },
    }
    return eta, diagnostics


def compose(tv: TaskVectors, parts: Parts, hp: dict, sink: Sink | None = None) -> MergeResult:
    """θ* = (θ0 + τ_core) + η τ_res key by key from the scratches (eq. 6); no input is re-read
    except the heads (averaged) and the non-floating keys (copied from θ0)."""
    eta, diagnostics = point_coefficients(parts, hp)
    bases = iter(parts.cores[(hp["core"], hp["k"])][2].replay())
    residuals = iter(parts.residuals[hp["rank"]].scratch.replay())

    def merged(p: TensorPlan) -> torch.Tensor:
        (base,), (res,) = next(bases), next(residuals)
        return base if eta == 0.0 else torch.add(base, res, alpha=eta)

    sink = tv.emit(merged, sink)
    result = tv.result("r2m", _hparams(hp), sink, diagnostics)
    result.diagnostics["degenerate"] = None
    return result


def _hparams(hp: dict) -> dict:
    return {"alpha": hp["alpha"], "rank": hp["rank"], "k": hp["k"], "core": hp["core"], "eta_mode": hp["eta_mode"]}


def _full(hp: dict) -> dict:
    return {"alpha": 0.5, "rank": 0.7, "k": 1, "core": "centered", "eta_mode": "normalized", **hp}


def r2m_points(tv: TaskVectors, points: Sequence[dict], *, rtol: float = 1e-5, sinks=None) -> Iterator[tuple[dict, MergeResult]]:
    """Every (α, r, k, core, η mode) point from ONE analysis: inputs are read twice in all (analysis,
    build), then each point is composed from the scratches. Yields (point, result) in `points` order;
    `sinks(point)` may give each point its own sink (default: the runtime's, else in memory)."""
    points = [_full(hp) for hp in points]
    for hp in points:
        check_point(hp)
    if tv.n == 1:
        for hp in points:
            yield hp, _as_wa(average(tv, {"n_specialists": 1, "degenerate": "single specialist"}, sinks(hp) if sinks else None), hp)
        return
    an = analyse(tv, ranks=[hp["rank"] for hp in points], rtol=rtol)
    reason = degenerate(an.g, tv.n, rtol)
    if reason:
        an.bases.close()
        for hp in points:
            yield hp, _as_wa(average(tv, {"n_specialists": tv.n, "degenerate": reason}, sinks(hp) if sinks else None), hp)
        return
    parts = build(tv, an, [(hp["core"], hp["k"]) for hp in points])
    try:
        for hp in points:
            yield hp, compose(tv, parts, hp, sinks(hp) if sinks else None)
    finally:
        parts.close()


def r2m(
    pretrained,
    specialists: Sequence,
    *,
    alpha: float = 0.5,
    rank: float = 0.7,
    k: int = 1,
    eta_mode: Literal["normalized", "literal"] = "normalized",
    core: Literal["centered", "uncentered"] = "centered",
    rtol: float = 1e-5,
    runtime: Runtime | None = None,
) -> MergeResult:
    """R²M(α, r, k) of docs/method.md, "R²M". Defaults α = 0.5, r = 0.7, k = 1 (paper C.4)."""
    hp = {"alpha": alpha, "rank": rank, "k": k, "core": core, "eta_mode": eta_mode}
    check_point(hp)
    tv = TaskVectors(pretrained, specialists, runtime)
    ((_, result),) = list(r2m_points(tv, [hp], rtol=rtol))
    return result


def _as_wa(result: MergeResult, hparams: dict) -> MergeResult:
    result.method, result.hparams = "r2m", _hparams(hparams)
    return result
