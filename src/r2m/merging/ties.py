"""TIES-merging (Yadav et al., 2023), streamed exactly.

Official form (the authors' `ties_merging` code):
1. trim: keep τ_i's entries with |τ_i| ≥ the k-th smallest |τ_i| over the *whole flattened*
   task vector, k = D − ⌊D·p⌋ (top-p fraction, global per task, not per tensor);
2. elect: γ = sign(Σ_i trimmed_i); coordinates with γ = 0 take the sign of Σ γ over all
   coordinates ("majority");
3. disjoint mean: average the trimmed entries whose sign equals γ (ignoring zeros);
4. θ_ties = θ0 + λ · merged.
Paper B.1's variant (`form="sum"`): θ_avg + λ · Σ_i (trimmed_i on the elected sign).
Grid (§4 tuning protocol, internal composition): p ∈ {0.1, 0.3, 0.5, 0.7}; λ = 1.

The global k-th value is found without holding D values: |τ| as float32 bits is monotone, so a
radix select over two streamed histograms (high 16 bits, then low 16 bits inside the chosen
bin) gives the exact threshold. The majority sign is known only after the merge pass; the few
coordinates it changes (exact cancellations) are patched into the sink at the end.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

from r2m.errors import MergeError
from r2m.merging.taskvectors import MergeResult, Runtime, TaskVectors, TensorPlan, row_sum, task_vectors, weight_mean

_HIGH = 1 << 15  # |x| has sign bit 0, so bits >> 16 < 2^15
_LOW = 1 << 16


def _abs_bits(tau: torch.Tensor) -> torch.Tensor:
    return tau.abs().view(torch.int32)


def _kth_bin(counts: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the bin holding the k-th smallest value (1-based) and k's rank inside it."""
    cum = counts.cumsum(1)
    b = (cum < k.unsqueeze(1)).sum(1)
    before = torch.where(b > 0, cum.gather(1, (b - 1).clamp_min(0).unsqueeze(1)).squeeze(1), torch.zeros_like(b))
    return b, k - before


def trim_thresholds(tv: TaskVectors, top_p: float) -> tuple[torch.Tensor, int]:
    """Per task i: the k-th smallest |τ_i| over all D merged coordinates (two streamed passes)."""
    n = tv.n
    high = torch.zeros((n, _HIGH), dtype=torch.int64)
    d = 0
    for _, theta0, stack in tv.stream(desc="ties: trim (1/2)"):
        tau = task_vectors(theta0, stack)
        for i in range(n):
            high[i] += torch.bincount(_abs_bits(tau[i]) >> 16, minlength=_HIGH)
        d += stack.shape[1]
    k = torch.full((n,), d - int(d * top_p), dtype=torch.int64).clamp_min(1)
    hbin, rank = _kth_bin(high, k)
    low = torch.zeros((n, _LOW), dtype=torch.int64)
    for _, theta0, stack in tv.stream(desc="ties: trim (2/2)"):
        tau = task_vectors(theta0, stack)
        for i in range(n):
            bits = _abs_bits(tau[i])
            sel = bits[(bits >> 16) == hbin[i]]
            low[i] += torch.bincount(sel & 0xFFFF, minlength=_LOW)
    lbin, _ = _kth_bin(low, rank)
    thresholds = ((hbin << 16) | lbin).to(torch.int32).view(torch.float32)
    return thresholds, d


def ties(pretrained, specialists: Sequence, *, top_p: float = 0.2, lam: float = 1.0, form: Literal["official", "sum"] = "official", runtime: Runtime | None = None) -> MergeResult:
    if form not in ("official", "sum"):
        raise MergeError(f"TIES: form must be 'official' or 'sum', got {form!r}")
    if not 0 < top_p <= 1:
        raise MergeError(f"TIES: top-p must be in (0, 1], got {top_p}")
    tv = TaskVectors(pretrained, specialists, runtime)
    if top_p >= 1:
        thresholds, d = torch.zeros(tv.n), sum(p.numel for p in tv.merged)
    else:
        thresholds, d = trim_thresholds(tv, top_p)
    sign_total = 0
    pending: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # coordinates that flip if majority is +

    def combine(base: torch.Tensor, total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        if form == "sum":
            return base + lam * total
        return base + lam * total / count.clamp_min(1)  # step 3: disjoint mean

    def merged(p: TensorPlan, theta0: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
        nonlocal sign_total
        base = theta0 if form == "official" else weight_mean(stack)  # before τ overwrites the stack
        tau = task_vectors(theta0, stack)
        for i, row in enumerate(tau):  # step 1: trim in place
            row.mul_(row.abs() >= thresholds[i])
        gamma = torch.sign(row_sum(tau))  # step 2
        sign_total += int(gamma.sum())
        total, count = torch.zeros_like(gamma), torch.zeros_like(gamma)
        for row in tau:  # γ = 0 selects negatives, as in the official code
            selected = row * torch.where(gamma > 0, row > 0, row < 0)
            total += selected
            count += selected != 0
        out = combine(base, total, count)  # step 4
        undecided = (gamma == 0).nonzero().squeeze(1)
        if undecided.numel():
            alt = tau[:, undecided]
            alt = alt * (alt > 0)
            has_positive = (alt > 0).any(0)
            if has_positive.any():  # exact cancellations: the value if the majority sign is +
                idx, alt = undecided[has_positive], alt[:, has_positive]
                pending.append((p.key, idx, combine(base[idx], alt.sum(0), (alt != 0).sum(0).to(alt.dtype))))
        return out

    sink = tv.write(merged, desc="ties")
    if sign_total > 0:
        for key, idx, values in pending:
            sink.patch(key, idx, values)
    diagnostics = {
        "n_specialists": tv.n,
        "trim_thresholds": [float(t) for t in thresholds],
        "kept_fraction_target": top_p,
        "n_coordinates": d,
        "majority_sign": (sign_total > 0) - (sign_total < 0),
        "patched_coordinates": sum(int(i.numel()) for _, i, _ in pending) if sign_total > 0 else 0,
    }
    return tv.result("ties", {"top_p": top_p, "lam": lam, "form": form}, sink, diagnostics)
