"""TIES-merging (Yadav et al., 2023), streamed exactly, reading the inputs twice.

Official form (the authors' `ties_merging` code):
1. trim: keep τ_i's entries with |τ_i| ≥ the k-th smallest |τ_i| over the *whole flattened*
   task vector, k = D − ⌊D·p⌋ (top-p fraction, global per task, not per tensor);
2. elect: γ = sign(Σ_i trimmed_i); coordinates with γ = 0 take the sign of Σ γ over all
   coordinates ("majority");
3. disjoint mean: average the trimmed entries whose sign equals γ (ignoring zeros);
4. θ_ties = θ0 + λ · merged.
Paper B.1's variant (`form="sum"`): θ_avg + λ · Σ_i (trimmed_i on the elected sign).
Grid (§4 tuning protocol, internal composition): p ∈ {0.1, 0.3, 0.5, 0.7}; λ = 1.

The global k-th value (step 1) is found without holding D values: |τ| as float32 bits is
monotone, so a radix select gives the exact threshold, and the inputs are read twice:
- pass 1 histograms the high 19 bits of |τ_i| (bits >> 12) per task, which fixes each task's
  boundary bin (the one holding the k-th smallest) and k's rank inside it;
- pass 2 is the merge: entries above their task's boundary bin are kept, entries below it trimmed,
  and the few inside it (about 0.1% of the coordinates) trimmed provisionally, while the merge
  counts their low 12 bits (the histogram that finishes the radix select) and records every
  coordinate where some task has one (its N τ values and its base value).
After the pass the exact thresholds are known: the recorded coordinates go through steps 1–4
again with the exact trim (the same arithmetic, sums in a fixed order, so the result is
bit-identical to trimming every coordinate with the exact thresholds) and are patched into the
sink where the value changed. The majority sign of step 2 is also known only after the merge
pass; the coordinates it changes (exact cancellations) are patched last.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

from r2m.merging.taskvectors import (MergeResult, Runtime, TaskVectors, TensorPlan, check_choice, check_ratio, row_sum, task_vectors,
                                     weight_mean)

# The radix split: pass 1 histograms |τ|'s float32 bits >> _SHIFT (the sign bit is 0, so fewer than
# 2^(31 − _SHIFT) bins), the merge pass the low _SHIFT bits inside each task's boundary bin. A bin
# spans a relative width of 2^(_SHIFT − 23) of |τ|: 12 bits keep the boundary bins (the
# coordinates recorded and patched) 16× rarer than 16 bits, for 4 MB histograms per task.
_SHIFT = 12
_HIGH = 1 << (31 - _SHIFT)
_LOW = 1 << _SHIFT
_BATCH = 1 << 20  # small keys' high bits are buffered up to this many values per task before counting
_BLOCK = 1 << 18  # columns per block of the ordered sums (the accumulator stays in cache)


def ordered_sum(rows: torch.Tensor) -> torch.Tensor:
    """Σ_i rows_i accumulated in row order from +0: ((0 + r_1) + r_2) + … for every column.

    This is the order of torch's vectorised dim-0 sum for N < 16 rows, but torch sums the last
    columns of a block in another order from N = 5 on, depending on the tensor's width; a fixed
    order makes the boundary fix-up (a few gathered columns) bit-identical to the streamed pass."""
    n, m = rows.shape
    out = torch.empty(m, dtype=rows.dtype)
    for j in range(0, m, _BLOCK):
        acc = torch.add(rows[0, j : j + _BLOCK], 0.0, out=out[j : j + _BLOCK])
        for i in range(1, n):
            acc.add_(rows[i, j : j + _BLOCK])
    return out


def _kth_bin(counts: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the bin holding the k-th smallest value (1-based) and k's rank inside it."""
    cum = counts.cumsum(1)
    b = (cum < k.unsqueeze(1)).sum(1)
    before = torch.where(b > 0, cum.gather(1, (b - 1).clamp_min(0).unsqueeze(1)).squeeze(1), torch.zeros_like(b))
    return b, k - before


class _RowHistogram:
    """Per-task counts of small integers, accumulated over keys. Small keys are buffered and counted
    together: every `bincount` zeroes a `bins`-long output, which would dominate for 1k-value keys."""

    def __init__(self, n: int, bins: int):
        self.counts = torch.zeros((n, bins), dtype=torch.int64)
        self.bins = bins
        self._pending: list[list[torch.Tensor]] = [[] for _ in range(n)]
        self._buffered = 0

    def add(self, i: int, values: torch.Tensor) -> None:
        if values.numel() >= _BATCH:
            self.counts[i] += torch.bincount(values, minlength=self.bins)
            return
        self._pending[i].append(values.clone())
        if i == len(self._pending) - 1:
            self._buffered += values.numel()
            if self._buffered >= _BATCH:
                self.flush()

    def flush(self) -> torch.Tensor:
        for i, parts in enumerate(self._pending):
            if parts:
                self.counts[i] += torch.bincount(torch.cat(parts), minlength=self.bins)
                parts.clear()
        self._buffered = 0
        return self.counts


def high_bins(tv: TaskVectors, top_p: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Pass 1: per task i, the high-bits bin holding the k-th smallest |τ_i| over all D merged
    coordinates, k's rank inside that bin, and D."""
    hist = _RowHistogram(tv.n, _HIGH)
    d = 0
    for _, theta0, stack in tv.stream(desc="ties: trim (1/2)"):
        high = task_vectors(theta0, stack).abs_().view(torch.int32).bitwise_right_shift_(_SHIFT)  # in the streamed buffer
        for i in range(tv.n):
            hist.add(i, high[i])
        d += stack.shape[1]
    k = torch.full((tv.n,), d - int(d * top_p), dtype=torch.int64).clamp_min(1)
    hbin, rank = _kth_bin(hist.flush(), k)
    return hbin, rank, d


class _BoundaryTrim:
    """Step 1 inside the merge pass, given each task's boundary bin from pass 1."""

    def __init__(self, tv: TaskVectors, hbin: torch.Tensor, rank: torch.Tensor):
        self.n = tv.n
        self.hbin = hbin.to(torch.int32).unsqueeze(1)
        self.rank = rank
        # |τ| ≥ the first value of the next bin  ⟺  high bits > hbin (monotone bits; inf bits cap it)
        self.above = ((hbin + 1) << _SHIFT).clamp_max(0x7F800000).to(torch.int32).view(torch.float32).unsqueeze(1)
        self.zero_bin = [i for i in range(self.n) if int(hbin[i]) == 0]  # threshold < 2^(_SHIFT − 149): holds τ = 0
        self.low = torch.zeros((self.n, _LOW), dtype=torch.int64)
        self.records: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # key, idx, τ[:, idx], base[idx]
        self.thresholds: torch.Tensor | None = None

    def provisional(self, key: str, tau: torch.Tensor, base: torch.Tensor, abs_buf: torch.Tensor, mask: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
        """Trim `tau` (N×numel) in place, boundary-bin entries as trimmed; record the coordinates
        where some task has a boundary-bin entry and return them (flat indices)."""
        a = torch.abs(tau, out=abs_buf)
        keep = torch.ge(a, self.above, out=mask)  # float 0/1: above the boundary bin
        undecided = torch.eq(a.view(torch.int32).bitwise_right_shift_(_SHIFT), self.hbin, out=flags)
        for i in self.zero_bin:  # τ = 0 is the same trimmed or kept: count it here, never record it
            nonzero = tau[i] != 0
            self.low[i, 0] += tau.shape[1] - int(nonzero.sum())
            undecided[i] &= nonzero
        idx = undecided.view(torch.uint8).amax(0).nonzero().squeeze(1)
        if idx.numel():
            cols = tau[:, idx]
            bits = cols.abs().view(torch.int32)
            inside = ((bits >> _SHIFT) == self.hbin) & (bits != 0)
            for i in range(self.n):
                self.low[i] += torch.bincount(bits[i][inside[i]] & (_LOW - 1), minlength=_LOW)
            self.records.append((key, idx, cols, base[idx]))
        tau.mul_(keep)
        return idx

    def finish(self) -> torch.Tensor:
        """The exact per-task thresholds: the k-th smallest |τ_i| (float32)."""
        lbin, _ = _kth_bin(self.low, self.rank)
        self.thresholds = ((self.hbin.squeeze(1).to(torch.int64) << _SHIFT) | lbin).to(torch.int32).view(torch.float32)
        return self.thresholds


def _elect(tau: torch.Tensor, tmp: torch.Tensor, mask: torch.Tensor, skip: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """Steps 2–3 on trimmed rows `tau` (N×m, overwritten with the selected entries; `tmp` and
    `mask` are N×m float scratch).

    Returns Σ_i selected_i, the count of selected entries, Σγ and the exact cancellations (γ = 0
    columns holding nonzero entries: their indices and trimmed entries, for the majority sign), the
    last two over the columns not in `skip`."""
    gamma = torch.sign(ordered_sum(tau))  # step 2
    sign_sum = int(gamma.sum())
    # γ = 0 selects negatives, as in the official code: agreement ⟺ τ · (γ > 0 ? 1 : −1) > 0
    agree = torch.gt(torch.mul(tau, torch.where(gamma > 0, 1.0, -1.0), out=tmp), 0, out=mask)
    count = row_sum(agree)  # exact in any order
    # a γ = 0 column has a positive entry iff it has a negative one (a selected entry): Σ = 0
    cancelled = (gamma == 0) & (count > 0)
    if skip is not None and skip.numel():
        sign_sum -= int(gamma[skip].sum())
        cancelled[skip] = False
    cancelled = cancelled.nonzero().squeeze(1)
    alt = tau[:, cancelled]
    tau.mul_(agree)  # step 3: the entries on the elected sign (and NaN, which must reach the output)
    return ordered_sum(tau), count, sign_sum, cancelled, alt


def ties(pretrained, specialists: Sequence, *, top_p: float = 0.2, lam: float = 1.0, form: Literal["official", "sum"] = "official", runtime: Runtime | None = None) -> MergeResult:
    check_choice("TIES", "form", form, ("official", "sum"))
    check_ratio("TIES", "top-p", top_p)
    tv = TaskVectors(pretrained, specialists, runtime)
    trim: _BoundaryTrim | None = None
    if top_p >= 1:  # |τ| ≥ 0 keeps everything
        d = sum(p.numel for p in tv.merged)
    else:
        hbin, rank, d = high_bins(tv, top_p)
        trim = _BoundaryTrim(tv, hbin, rank)
    sign_total = 0
    pending: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # coordinates that change if majority is +
    largest = tv.n * max((p.numel for p in tv.merged), default=0)
    work = torch.empty(largest), torch.empty(largest), torch.empty(largest, dtype=torch.bool)  # reused per key

    def combine(base: torch.Tensor, total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        if form == "sum":
            return base + lam * total
        return base + lam * total / count.clamp_min(1)  # step 3: disjoint mean

    def majority_alternative(key: str, idx: torch.Tensor, alt: torch.Tensor, base: torch.Tensor) -> None:
        """γ = 0 coordinates `idx` (their trimmed entries `alt`, base values `base`): the value they
        take if the majority sign is +."""
        alt = alt * (alt > 0)
        has_positive = (alt > 0).any(0)
        if has_positive.any():  # exact cancellations
            alt = alt[:, has_positive]
            pending.append((key, idx[has_positive], combine(base[has_positive], ordered_sum(alt), (alt != 0).sum(0).to(alt.dtype))))

    def merged(p: TensorPlan, theta0: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
        nonlocal sign_total
        base = theta0 if form == "official" else weight_mean(stack)  # before τ overwrites the stack
        tau = task_vectors(theta0, stack)
        tmp, mask, flags = (w[: tau.numel()].view(tau.shape) for w in work)
        skip = trim.provisional(p.key, tau, base, tmp, mask, flags) if trim is not None else None  # step 1
        total, count, sign_sum, cancelled, alt = _elect(tau, tmp, mask, skip)
        sign_total += sign_sum
        if cancelled.numel():
            majority_alternative(p.key, cancelled, alt, base[cancelled])
        return combine(base, total, count)  # step 4

    sink = tv.write(merged, desc="ties")
    thresholds = torch.zeros(tv.n) if trim is None else trim.finish()
    for key, idx, cols, base in trim.records if trim is not None else ():
        # the boundary-bin coordinates, trimmed exactly: the same steps on their N entries
        absolute = cols.abs()
        changed = ((absolute < trim.above) & (absolute >= thresholds.unsqueeze(1)) & (cols != 0)).any(0)
        cols.mul_(absolute >= thresholds.unsqueeze(1))
        total, count, sign_sum, cancelled, alt = _elect(cols, torch.empty_like(cols), torch.empty_like(cols), None)
        sign_total += sign_sum
        if changed.any():
            sink.patch(key, idx[changed], combine(base[changed], total[changed], count[changed]))
        if cancelled.numel():
            majority_alternative(key, idx[cancelled], alt, base[cancelled])
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
