"""R²M, Real-aware Residual Model Merging (paper §3.1, eqs. 1-6), exactly as SPEC section 5.

    τ_i = θ_i − θ0,  τ̄ = (1/N) Σ_i τ_i,  M_c = M − 1 τ̄ᵀ = U_c Σ_c V_cᵀ          (eqs. 1-2)
    τ_core = V_{c,k} V_{c,k}ᵀ τ̄                                                  (eq. 3)
    δ_i = τ_i − τ̄,  δ̃_i = SVD_r(δ_i) on attention/MLP matrices (Q, K, V split)   (A.5)
    m = (1/N) Σ_i ‖δ̃_i‖,  δ̂_i = m δ̃_i / (‖δ̃_i‖ + ε)                              (eq. 4)
    τ_res = (1/N) Σ_i δ̂_i                                                        (eq. 5)
    η = α ‖τ_core‖ / ‖τ_res‖  (§4 tuning protocol; eq. 6 literal: η = α ‖τ_core‖)
    θ* = θ0 + τ_core + η τ_res                                                   (eq. 6)

Nothing D-dimensional beyond one tensor is ever held: V_{c,k} = M_cᵀ U_k Σ_k⁻¹, so
τ_core = M_cᵀ U_k Σ_k⁻² U_kᵀ (M_c τ̄) is a combination Σ_i a_i τ_i whose coefficients come from the
N×N Gram matrix G = M Mᵀ alone (M_c M_cᵀ = C G C, M_c τ̄ = C G 1/N with C = I − 11ᵀ/N).
Likewise τ_res = Σ_i w_i δ̃_i with w_i = m / (N (‖δ̃_i‖ + ε)) and ‖τ_res‖² = wᵀ G̃ w, G̃ = Gram of
the δ̃_i. So one streamed pass (`analyse`: G, G̃ and the layerwise truncations, whose projector
bases go to scratch) gives every scalar, and a second pass (`compose`) writes
θ* = θ0 + Σ_i a_i τ_i + η Σ_i w_i δ̃_i key by key, replaying the stored projectors instead of
recomputing SVDs. α only enters η, so `compose` can be called for several α after one analysis.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch

from r2m.errors import MergeError
from r2m.merging.linalg import Projector, apply_blocks, gram, top_singular, truncate_blocks
from r2m.merging.taskvectors import MergeResult, Runtime, TaskVectors, TensorPlan, centred, task_vectors
from r2m.merging.wa import average

EPS = 1e-8  # ε of eq. 4


@dataclass
class Analysis:
    """Everything R²M needs from pass 1: N×N matrices and per-specialist norms (float64)."""

    rank: float
    k: int
    core: str
    rtol: float
    g: torch.Tensor  # M Mᵀ (uncentred Gram of the task vectors)
    g_res: torch.Tensor  # G̃: Gram of the truncated residuals δ̃_i
    svd_seconds: float
    scratch: object = None
    degenerate: str | None = None
    diagnostics: dict = field(default_factory=dict)


def analyse(tv: TaskVectors, *, rank: float = 0.7, k: int = 1, core: Literal["centered", "uncentered"] = "centered", rtol: float = 1e-5) -> Analysis:
    """Pass 1: G = M Mᵀ, the truncations δ̃_i (bases kept in scratch) and G̃ = Gram(δ̃)."""
    if core not in ("centered", "uncentered"):
        raise MergeError(f"R²M: core must be 'centered' or 'uncentered', got {core!r}")
    if not 0 < rank <= 1:
        raise MergeError(f"R²M: rank ratio r must be in (0, 1], got {rank}")
    if k < 1:
        raise MergeError(f"R²M: k must be at least 1, got {k}")
    n = tv.n
    g = torch.zeros((n, n), dtype=torch.float64)
    g_res = torch.zeros((n, n), dtype=torch.float64)
    scratch = tv.scratch()
    device = tv.runtime.resolved_device()
    svd_seconds = 0.0
    for p, theta0, stack in tv.stream(desc="r2m: analyse"):
        tau = task_vectors(theta0, stack)
        g_key = gram(tau)
        tv.require_finite(p.key, g_key)
        g += g_key
        delta = centred(tau)  # in place: τ is not needed any more
        if p.blocks:
            start = time.perf_counter()
            delta, projectors = truncate_blocks(delta, p.matrix_shape, p.blocks, rank, device)
            svd_seconds += time.perf_counter() - start
            scratch.append([t for pr in projectors for t in pr.tensors()] if projectors else [])
        g_res += gram(delta)
    return Analysis(rank, k, core, rtol, g, g_res, svd_seconds, scratch)


@dataclass
class Coefficients:
    """θ* = θ0 + Σ_i a_i τ_i + η Σ_i w_i δ̃_i, plus the diagnostics SPEC 5 asks for."""

    a: torch.Tensor
    w: torch.Tensor
    eta: float
    diagnostics: dict


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


def coefficients(an: Analysis, *, alpha: float = 0.5, eta_mode: Literal["normalized", "literal"] = "normalized") -> Coefficients:
    """Eqs. 3-6 on N×N matrices: core coefficients a, residual weights w, and η."""
    if eta_mode not in ("normalized", "literal"):
        raise MergeError(f"R²M: eta mode must be 'normalized' or 'literal', got {eta_mode!r}")
    n = an.g.shape[0]
    core = _core(an.g, an.core == "centered", an.k, an.rtol)
    other = _core(an.g, an.core != "centered", an.k, an.rtol)  # the other reading, for comparison only
    norms = an.g_res.diagonal().clamp_min(0).sqrt()  # ‖δ̃_i‖
    m = float(norms.mean())  # eq. 4
    w = m / (n * (norms + EPS))  # eq. 4-5: τ_res = Σ_i w_i δ̃_i
    res_norm = math.sqrt(max(float(w @ an.g_res @ w), 0.0))
    residual_zero = m == 0.0 or res_norm <= an.rtol * m  # Σ_i δ_i = 0: τ_res may vanish (e.g. N = 2)
    if residual_zero:
        eta, w = 0.0, torch.zeros_like(w)
    elif eta_mode == "normalized":
        eta = alpha * core["core_norm"] / res_norm  # §4: η_eff = α ‖τ_core‖ / ‖τ_res‖
    else:
        eta = alpha * core["core_norm"]  # eq. 6 as printed
    tau_bar = core["tau_bar_norm"]
    diagnostics = {
        "n_specialists": n,
        "core": an.core,
        "eta_mode": eta_mode,
        "tau_bar_norm": tau_bar,
        "core_norm": core["core_norm"],
        "core_ratio": core["core_norm"] / tau_bar if tau_bar > 0 else 0.0,
        "cos_v_tau_bar": core["cos_v_tau_bar"],
        "singular_values": core["singular_values"],
        "core_rank_used": core["rank_used"],
        "residual_norm": 0.0 if residual_zero else res_norm,
        "residual_zero": residual_zero,
        "residual_mean_norm": m,
        "residual_norms": [float(x) for x in norms],
        "eta": eta,
        "alpha": alpha,
        "rank": an.rank,
        "svd_seconds": an.svd_seconds,
        "other_core": {
            "core": "uncentered" if an.core == "centered" else "centered",
            "singular_values": other["singular_values"],
            "core_ratio": other["core_norm"] / tau_bar if tau_bar > 0 else 0.0,
            "cos_v_tau_bar": other["cos_v_tau_bar"],
        },
    }
    return Coefficients(core["a"], w, eta, diagnostics)


def degenerate(an: Analysis, tv: TaskVectors) -> str | None:
    """N = 1 or identical specialists (M_c = 0 up to the relative tolerance): R²M is WA."""
    if tv.n == 1:
        return "single specialist"
    g = an.g
    n = g.shape[0]
    c = torch.eye(n, dtype=torch.float64) - 1.0 / n
    top = float(torch.linalg.eigvalsh(c @ g @ c).max().clamp_min(0).sqrt())
    if top <= an.rtol * math.sqrt(max(float(g.trace()), 0.0)):
        return "identical specialists"
    return None


def compose(tv: TaskVectors, an: Analysis, co: Coefficients) -> MergeResult:
    """Pass 2: θ* = θ0 + Σ_i a_i τ_i + η Σ_i w_i δ̃_i, key by key (eq. 6)."""
    device = tv.runtime.resolved_device()
    replay = iter(an.scratch.replay())
    a = co.a.to(torch.float32)
    w = (co.eta * co.w).to(torch.float32)

    def merged(p: TensorPlan, theta0: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
        tau = task_vectors(theta0, stack)
        out = theta0 + a @ tau  # θ0 + τ_core
        if co.eta == 0.0:
            return out
        delta = centred(tau)  # in place
        if p.blocks:
            stored = next(replay)
            if stored:
                projectors = [Projector.from_tensors(stored[j], stored[j + 1]) for j in range(0, len(stored), 2)]
                delta = apply_blocks(delta, p.matrix_shape, p.blocks, projectors, device)
        return out + w @ delta  # + η τ_res

    sink = tv.write(merged, desc="r2m: compose")
    hparams = {"alpha": co.diagnostics["alpha"], "rank": an.rank, "k": an.k, "core": an.core, "eta_mode": co.diagnostics["eta_mode"]}
    return tv.result("r2m", hparams, sink, co.diagnostics)


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
    """R²M(α, r, k) of SPEC section 5. Defaults α = 0.5, r = 0.7, k = 1 (paper C.4)."""
    tv = TaskVectors(pretrained, specialists, runtime)
    hparams = {"alpha": alpha, "rank": rank, "k": k, "core": core, "eta_mode": eta_mode}
    if tv.n == 1:
        return _as_wa(average(tv, {"n_specialists": 1, "degenerate": "single specialist"}), hparams)
    an = analyse(tv, rank=rank, k=k, core=core, rtol=rtol)
    return merge_from_analysis(tv, an, alpha=alpha, eta_mode=eta_mode)


def merge_from_analysis(tv: TaskVectors, an: Analysis, *, alpha: float, eta_mode: str = "normalized") -> MergeResult:
    """Pass 2 for one α (the selection helper reuses one analysis across the α grid)."""
    co = coefficients(an, alpha=alpha, eta_mode=eta_mode)
    hparams = {"alpha": alpha, "rank": an.rank, "k": an.k, "core": an.core, "eta_mode": eta_mode}
    reason = degenerate(an, tv)
    if reason:
        return _as_wa(average(tv, {**co.diagnostics, "degenerate": reason}), hparams)
    result = compose(tv, an, co)
    result.diagnostics["degenerate"] = None
    return result


def _as_wa(result: MergeResult, hparams: dict) -> MergeResult:
    result.method, result.hparams = "r2m", dict(hparams)
    return result
