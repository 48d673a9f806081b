"""Exact low-rank truncation and small Gram-matrix algebra.

Truncation (SVD_r of A.5): the best rank-k approximation of W (m×n) is W V_k V_kᵀ with V_k the
top-k eigenvectors of the small Gram matrix WᵀW (or U_k U_kᵀ W from WWᵀ when m < n). The projection
uses the complement basis when k > p/2.

How the eigendecomposition is done was chosen by measurement (bench/truncation_bench.py,
bench/results/truncation_bench.md): the Gram is formed in float32 and eigendecomposed in float32
(torch.linalg.eigh), which is about twice as fast as float64 — and is kept only where it is
*certified* for the rank asked: every computed eigenvalue of a backward-stable symmetric
eigensolver is within ‖E‖ ≈ c·ε·max|λ| of the exact one (LAPACK Users' Guide, "Error bounds for the
symmetric eigenproblem", whose estimate takes c = 1, as we do), so the energy a computed basis discards exceeds
the optimum ‖W − W_k‖² = Σ_{j>k} λ_j by at most 2 (p − k)‖E‖ (Weyl, and each Rayleigh quotient of a
computed vector is within ‖E‖ of its computed eigenvalue). Where that bound is more than TAIL_TOL
of the discarded energy — a spectrum whose tail sits below float32's resolution, e.g. a few large
singular values over a noise floor 500× smaller — the matrix is eigendecomposed again in float64
and that rank uses the float64 bases. The decision depends only on the matrix and k, so a grid's
truncations stay bitwise those of the single-rank merge. The bound covers the eigensolver; the
float32 rounding of the Gram itself was measured instead (float32 Gram + float64 eigh stays within
1.6e-4 of the optimum over the accuracy test's 60 cases). float32 alone is not exact (1.5 % above
the optimum on the low-rank + noise spectrum); LAPACK ?syevr on a subset, torch.linalg.svd and
float64 throughout were slower (the measurements are in the results file).

One eigendecomposition serves every rank: the top-k subspaces are nested, so `Eigenbases` keeps
the columns that a set of ranks needs (the top max-k for the ranks applied directly, the bottom
max(p−k) for those applied through the complement) and `project` slices them. A projection for
rank k is computed the same way whether the bases were made for one rank or for a grid, and
through the top basis it is a sum of chunks between fixed boundaries, so the nested ranks of a grid
apply each top column once (`Eigenbases.project_ranks`) and still match a single rank bitwise. On
CUDA the work runs on the GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

EPS32 = float(torch.finfo(torch.float32).eps)
CHUNK_RATIOS = (0.1, 0.3, 0.5)  # fixed chunk boundaries of top-basis projections: the grid's ranks ≤ 1/2
TAIL_TOL = 2e-3  # allowed excess of ‖W − W̃‖² over the optimum: the accuracy criterion, 1e-3 on the norm


def truncation_rank(shape: tuple[int, int], r: float) -> int:
    """k = ⌊r · min(m, n)⌋, at least 1 (docs/method.md, "R²M", decision 2). A tiny epsilon absorbs float error in r·p."""
    return max(1, math.floor(r * min(shape) + 1e-9))


def chunk_ends(p: int) -> list[int]:
    """The chunk boundaries ⌊ρ·p⌋ of a top-basis projection (Eigenbases.project_ranks), at least 1."""
    return sorted({truncation_rank((p, p), rho) for rho in CHUNK_RATIOS})


def _keep(k: int, p: int) -> bool:
    """Apply W B Bᵀ with the top-k basis (True) or W − W C Cᵀ with the bottom p−k (False)."""
    return k <= p - k


def certified(evals: torch.Tensor, k: int) -> torch.Tensor:
    """Per matrix (rows of evals: a float32 eigendecomposition's eigenvalues, ascending): is the rank-k
    truncation from its eigenvectors within TAIL_TOL of the optimum by the bound in the module text?"""
    p = evals.shape[1]
    bound = 2 * (p - k) * EPS32 * evals.abs().amax(1)  # 2 (p − k)‖E‖ with LAPACK's ‖E‖ ≈ ε·max|λ|
    return bound <= TAIL_TOL * evals[:, : p - k].clamp_min(0).sum(1)


@dataclass
class Eigenbases:
    """Eigenvectors (ascending eigenvalue order) of the Gram of one block of each specialist.

    low:  B × p × L   the L bottom eigenvectors (complement bases of the ranks with k > p/2)
    high: B × p × H   the H top eigenvectors (bases of the ranks with k ≤ p/2)
    side: "right" (Gram WᵀW, W̃ = W B Bᵀ) or "left" (Gram WWᵀ, W̃ = B Bᵀ W).
    ks:   the ranks they were made for; exact[i, j]: rank ks[j] of matrix i uses the float64
          eigendecomposition's columns, row row64[i] of low64/high64 (−1: none was needed)."""

    low: torch.Tensor
    high: torch.Tensor
    side: str
    ks: tuple[int, ...]
    exact: torch.Tensor
    row64: torch.Tensor
    low64: torch.Tensor
    high64: torch.Tensor

    @property
    def p(self) -> int:
        return self.low.shape[1]

    def _source(self, i: int, k: int) -> tuple[str, torch.Tensor, torch.Tensor]:
        """Which eigendecomposition rank k of matrix i uses: (tag, its bottom and top columns)."""
        if bool(self.exact[i, self.ks.index(k)]):
            row = int(self.row64[i])
            return "float64", self.low64[row], self.high64[row]
        return "float32", self.low[i], self.high[i]

    def _apply(self, w: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """W B Bᵀ (right) or B Bᵀ W (left) for the columns B, copied fresh first: BLAS rounds
        differently for differently aligned operands, and a grid's slice must give bitwise the
        single rank's projection."""
        b = torch.empty(cols.shape, dtype=cols.dtype, device=cols.device).copy_(cols)
        return (w @ b) @ b.T if self.side == "right" else b @ (b.T @ w)

    def project(self, w: torch.Tensor, i: int, k: int) -> torch.Tensor:
        """Rank-k truncation of specialist i's block w (m×n, on the bases' device)."""
        return self.project_ranks(w, i, [k])[k]

    def project_ranks(self, w: torch.Tensor, i: int, ks: Sequence[int]) -> dict[int, torch.Tensor]:
        """Rank-k truncations of specialist i's block w for every k in ks.

        A rank applied through the top basis is the sum, in order, of its chunks between the fixed
        boundaries ⌊ρ·p⌋ (ρ in CHUNK_RATIOS) below k, then k: so the nested ranks of a grid share
        their common prefix (each top column is applied once), and every result is bitwise what
        `project` gives for that rank alone. A rank with k > p/2 is W minus its complement's part."""
        p = self.p
        out: dict[int, torch.Tensor] = {}
        prefix: dict[tuple[str, int], torch.Tensor] = {}  # (eigendecomposition, chunk end) -> the sum so far
        for k in sorted(set(ks)):
            tag, low, high = self._source(i, k)
            if not _keep(k, p):
                out[k] = w - self._apply(w, low[:, : p - k])
                continue
            top = high.shape[1]
            total, start = None, 0
            for end in [b for b in chunk_ends(p) if b < k] + [k]:
                if (tag, end) not in prefix:
                    part = self._apply(w, high[:, top - end : top - start])
                    prefix[(tag, end)] = part if total is None else total + part
                total, start = prefix[(tag, end)], end
            out[k] = total
        return out

    def tensors(self) -> list[torch.Tensor]:
        flags = torch.tensor([self.side == "right"])
        return [self.low, self.high, flags, torch.tensor(self.ks), self.exact, self.row64, self.low64, self.high64]

    @staticmethod
    def from_tensors(tensors: Sequence[torch.Tensor], device: torch.device) -> "Eigenbases":
        low, high, flags, ks, exact, row64, low64, high64 = tensors
        side = "right" if bool(flags[0]) else "left"
        return Eigenbases(low.to(device), high.to(device), side, tuple(int(k) for k in ks), exact.cpu(), row64.cpu(), low64.to(device), high64.to(device))


N_TENSORS = 8  # len(Eigenbases.tensors())


def _columns(vecs: torch.Tensor, ks: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    p = vecs.shape[-1]
    high = max((k for k in ks if _keep(k, p)), default=0)
    low = max((p - k for k in ks if not _keep(k, p)), default=0)
    return vecs[:, :, :low].contiguous(), vecs[:, :, p - high :].contiguous()


def eigenbases(w: torch.Tensor, ks: Sequence[int]) -> tuple[dict[int, torch.Tensor], Eigenbases]:
    """One Gram eigendecomposition per matrix of the batch w (B×m×n), for every k in ks (each < p).

    Returns ({k: ‖W_k‖² per matrix, float64}, the bases the ks need). float32 eigh, redone in float64
    for the matrices where some k is not `certified`."""
    ks = tuple(sorted(set(ks)))
    _, m, n = w.shape
    right = m >= n
    grams = w.transpose(1, 2) @ w if right else w @ w.transpose(1, 2)  # float32 Gram
    evals32, vecs = torch.linalg.eigh(grams)
    evals = evals32.to(torch.float64)
    exact = torch.stack([~certified(evals, k) for k in ks], dim=1).cpu()  # B × len(ks)
    need = exact.any(1)
    row64 = torch.full((w.shape[0],), -1, dtype=torch.long)
    low, high = _columns(vecs, ks)
    low64, high64 = low[:0], high[:0]
    kept = {k: evals[:, evals.shape[1] - k :].clamp_min(0).sum(1).cpu() for k in ks}
    if bool(need.any()):
        idx = need.nonzero().flatten()
        row64[idx] = torch.arange(len(idx))
        e64, v64 = torch.linalg.eigh(grams[idx.to(grams.device)].to(torch.float64))
        low64, high64 = _columns(v64.to(torch.float32), ks)
        for j, k in enumerate(ks):
            better = e64[:, e64.shape[1] - k :].clamp_min(0).sum(1).cpu()
            rows = exact[idx, j]
            kept[k][idx[rows]] = better[rows]
    side = "right" if right else "left"
    return kept, Eigenbases(low, high, side, ks, exact, row64, low64, high64)


def block_view(delta: torch.Tensor, shape: tuple[int, int], blocks: int) -> torch.Tensor:
    """N × numel rows seen as N × blocks × (m/blocks) × n matrices (Q, K, V thirds for blocks = 3)."""
    return delta.reshape(delta.shape[0], blocks, shape[0] // blocks, shape[1])


def truncate_blocks(delta: torch.Tensor, shape: tuple[int, int], blocks: int, r: float, device: torch.device) -> tuple[torch.Tensor, list[Eigenbases] | None]:
    """SVD_r of each specialist's matrix, split into `blocks` equal row blocks (Q, K, V thirds).

    delta: N × numel float32. Returns (δ̃ N × numel on CPU, one Eigenbases per block; None when r
    keeps the full rank, δ returned as is)."""
    n_spec = delta.shape[0]
    sub = (shape[0] // blocks, shape[1])
    k = truncation_rank(sub, r)
    if k >= min(sub):
        return delta, None
    parts = block_view(delta, shape, blocks).to(device)
    out = torch.empty_like(parts)
    bases = []
    for b in range(blocks):
        _, eb = eigenbases(parts[:, b], [k])
        for i in range(n_spec):
            out[i, b] = eb.project(parts[i, b], i, k)
        bases.append(eb)
    return out.reshape(n_spec, -1).cpu(), bases


def gram(rows: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """R Rᵀ in float64 (N × N) for rows R (N × numel), converted chunk by chunk (no N×numel float64 copy)."""
    out = torch.zeros((rows.shape[0], rows.shape[0]), dtype=torch.float64)
    for part in rows.split(chunk, dim=1):
        p64 = part.to(torch.float64)
        out += p64 @ p64.T
    return out


def top_singular(g: torch.Tensor, k: int, scale: float, rtol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From a Gram matrix A Aᵀ: (all singular values of A, descending; top-k left singular vectors U_k
    and values σ_k), keeping only σ_j > rtol·scale (singular values below count as zero)."""
    evals, evecs = torch.linalg.eigh(g)
    order = torch.argsort(evals, descending=True)
    sigma = evals[order].clamp_min(0).sqrt()
    u = evecs[:, order]
    kept = int((sigma[:k] > rtol * scale).sum()) if scale > 0 else 0
    return sigma, u[:, :kept], sigma[:kept]
