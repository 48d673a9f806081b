"""Exact low-rank truncation and small Gram-matrix algebra.

Truncation (SVD_r of A.5): the best rank-k approximation of W (m×n) is W V_k V_kᵀ with V_k the
top-k eigenvectors of the small Gram matrix WᵀW (or U_k U_kᵀ W from WWᵀ when m < n). Chosen by
measurement (bench/truncation_bench.py, bench/results/truncation_bench.md): the Gram is formed in
float32 and eigendecomposed in float64 (torch.linalg.eigh), the fastest candidate that stays the
best rank-k approximation to tolerance (tests/test_merging_grid.py, against the Eckart–Young optimum).
float32 eigh was faster still but is not exact (up to 1.5 % above the optimum when σ_1/σ_k is large);
float64 Gram + eigh (main before issue 14), LAPACK ?syevr on the needed subset (fast only for small
k, and a grid needs most columns), torch.linalg.svd and eigenvalues alone (a lower bound for any
"eigvalsh + projector") were slower. The projection uses the complement basis when k > p/2.

One eigendecomposition serves every rank: the top-k subspaces are nested, so `Eigenbases` keeps
the columns that a set of ranks needs (the top max-k for the ranks applied directly, the bottom
max(p−k) for those applied through the complement) and `project` slices them. A projection for
rank k is computed the same way whether the bases were made for one rank or for a grid, so a
grid's truncations are bitwise those of the single-rank merge. On CUDA the work runs on the GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch


def truncation_rank(shape: tuple[int, int], r: float) -> int:
    """k = ⌊r · min(m, n)⌋, at least 1 (SPEC 5 step 4). A tiny epsilon absorbs float error in r·p."""
    return max(1, math.floor(r * min(shape) + 1e-9))


def _keep(k: int, p: int) -> bool:
    """Apply W B Bᵀ with the top-k basis (True) or W − W C Cᵀ with the bottom p−k (False)."""
    return k <= p - k


@dataclass
class Eigenbases:
    """Eigenvectors (ascending eigenvalue order) of the Gram of one block of each specialist.

    low:  B × p × L   the L bottom eigenvectors (complement bases of the ranks with k > p/2)
    high: B × p × H   the H top eigenvectors (bases of the ranks with k ≤ p/2)
    side: "right" (Gram WᵀW, W̃ = W B Bᵀ) or "left" (Gram WWᵀ, W̃ = B Bᵀ W)."""

    low: torch.Tensor
    high: torch.Tensor
    side: str

    @property
    def p(self) -> int:
        return self.low.shape[1]

    def basis(self, i: int, k: int) -> tuple[torch.Tensor, bool]:
        """Specialist i's basis for rank k and whether it is kept or removed. Always a fresh copy:
        BLAS rounds differently for differently aligned operands, and a grid's slice must give
        bitwise the single rank's projection."""
        p, high = self.p, self.high.shape[2]
        part, keep = (self.high[i, :, high - k :], True) if _keep(k, p) else (self.low[i, :, : p - k], False)
        return torch.empty(part.shape, dtype=part.dtype, device=part.device).copy_(part), keep

    def project(self, w: torch.Tensor, i: int, k: int) -> torch.Tensor:
        """Rank-k truncation of specialist i's block w (m×n, on the bases' device)."""
        b, keep = self.basis(i, k)
        part = (w @ b) @ b.T if self.side == "right" else b @ (b.T @ w)
        return part if keep else w - part

    def tensors(self) -> list[torch.Tensor]:
        return [self.low, self.high, torch.tensor([self.side == "right"])]

    @staticmethod
    def from_tensors(low: torch.Tensor, high: torch.Tensor, flags: torch.Tensor, device: torch.device) -> "Eigenbases":
        return Eigenbases(low.to(device), high.to(device), "right" if bool(flags[0]) else "left")


def eigenbases(w: torch.Tensor, ks: Sequence[int]) -> tuple[torch.Tensor, Eigenbases]:
    """One Gram eigendecomposition per matrix of the batch w (B×m×n), for every k in ks.

    Returns (eigenvalues B×p ascending, float64; the bases the ks need). Every k must be < p."""
    _, m, n = w.shape
    p = min(m, n)
    right = m >= n
    grams = w.transpose(1, 2) @ w if right else w @ w.transpose(1, 2)  # float32 Gram
    evals, vecs = torch.linalg.eigh(grams.to(torch.float64))  # float64 eigh (float32 eigh is not exact), ascending
    vecs = vecs.to(torch.float32)
    high = max((k for k in ks if _keep(k, p)), default=0)
    low = max((p - k for k in ks if not _keep(k, p)), default=0)
    bases = Eigenbases(vecs[:, :, :low].contiguous(), vecs[:, :, p - high :].contiguous(), "right" if right else "left")
    return evals, bases


def kept_energy(evals: torch.Tensor, k: int) -> torch.Tensor:
    """‖W_k‖² per matrix from its Gram's ascending eigenvalues: the sum of the top k (float64)."""
    return evals[:, evals.shape[1] - k :].clamp_min(0).sum(1)


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
