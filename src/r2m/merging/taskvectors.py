"""θ0 and N specialists, validated against each other and read one key at a time.

`TaskVectors` is what every merge method works on. It checks the checkpoint contract once from
the headers (same keys and shapes, floating tensors where θ0 has floating tensors, heads
present in all specialists or none), then streams each key as float32 `θ0` and an `N × numel`
stack of specialists (finite values checked, the file and key named on failure), with the next
key prefetched on a background thread so reading overlaps computing.

Paper B.1: heads are never merged by the methods' rules; every merged backbone gets the mean of
the specialists' heads. BatchNorm running statistics get the specialists' mean too (buffers, not
task-vector coordinates). Non-floating tensors are copied from θ0.
"""

from __future__ import annotations

import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from r2m.checkpoint import HEAD_KEYS
from r2m.errors import MergeError
from r2m.merging.stream import DictSink, DiskScratch, MemoryScratch, Scratch, Sink, TensorSource, as_source

Kind = Literal["merge", "copy", "head", "statistic"]

# Attention and MLP weight matrices that the layerwise rank-r truncation acts on (docs/method.md, "R²M", decision 2),
# with the number of row blocks each is split into: open_clip fuses Q, K, V into `in_proj_weight`
# (the paper's HF CLIP keeps them separate), so it is truncated as three d×d thirds.
MATRIX_RULES: tuple[tuple[re.Pattern, int], ...] = (
    (re.compile(r"(^|\.)attn\.in_proj_weight$"), 3),
    (re.compile(r"(^|\.)attn\.out_proj\.weight$"), 1),
    (re.compile(r"(^|\.)mlp\.c_fc\.weight$"), 1),
    (re.compile(r"(^|\.)mlp\.c_proj\.weight$"), 1),
)


# Convolutional backbones (EfficientNet and kin, docs/method.md, "R²M", decision 2): pointwise (1×1) convolutions — the
# expansion/projection convs, the head conv and squeeze-excitation's reduce/expand FCs, which timm
# writes as 1×1 convs — are linear maps [out, in] and are truncated like the ViT matrices.
# Depthwise convs ([C, 1, k, k]), k×k convs, norms and embeddings stay as they are.


def is_pointwise_conv(shape: tuple[int, ...]) -> bool:
    return len(shape) == 4 and shape[2:] == (1, 1) and shape[1] > 1


# BatchNorm running statistics are buffers, not learned coordinates of a task vector: they take
# no part in TIES's sign vote, R²M's SVD or any truncation (TIES's trim could even leave a
# negative variance). Every merged model gets the specialists' mean statistics, as it gets their
# mean head (with BN frozen in fine-tuning they all equal θ0's, and so does the mean).
STATISTIC = re.compile(r"(^|\.)running_(mean|var)$")


def matrix_blocks(key: str, shape: tuple[int, ...]) -> int:
    """How many row blocks a key's matrix is truncated as (0: not an attention/MLP matrix or a
    pointwise convolution)."""
    if is_pointwise_conv(shape):
        return 1
    if len(shape) != 2:
        return 0
    for pattern, blocks in MATRIX_RULES:
        if pattern.search(key):
            if shape[0] % blocks:
                raise MergeError(f"key '{key}': shape {shape} cannot be split into {blocks} equal row blocks")
            return blocks
    return 0


@dataclass(frozen=True)
class TensorPlan:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # the dtype the merged tensor is written back in
    kind: Kind
    blocks: int = 0  # row blocks for the layerwise truncation (0 = untouched)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """The [out, in] matrix the layerwise truncation acts on (a 1×1 conv's kernel dims dropped)."""
        return (self.shape[0], self.numel // self.shape[0])


@dataclass
class Runtime:
    """How a merge runs (never what it computes): device for SVDs, scratch, output sink, progress."""

    device: torch.device | str | None = None
    scratch: Scratch | None = None
    sink: Sink | None = None
    progress: bool = False
    prefetch: bool = True
    # heads and BatchNorm statistics to emit instead of the inputs' mean: hierarchical merging's
    # level 2 reads group models but gives the mean over all the specialists (r2m.merging.hierarchy)
    averaged: Mapping[str, torch.Tensor] | None = None

    def resolved_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class MergeResult:
    """The merged state dict (None when streamed to a file sink) and the method's diagnostics."""

    method: str
    hparams: dict
    state_dict: dict[str, torch.Tensor] | None
    diagnostics: dict = field(default_factory=dict)


def _out_dtype(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """The specialists' common dtype (fp16/bf16 round-trip), promoted when they disagree."""
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


class TaskVectors:
    """Validated inputs of a merge: θ0 (pretrained) and θ_1..θ_N (specialists)."""

    def __init__(
        self,
        pretrained: TensorSource | Mapping[str, torch.Tensor] | str,
        specialists: Sequence[TensorSource | Mapping[str, torch.Tensor] | str],
        runtime: Runtime | None = None,
    ):
        if not specialists:
            raise MergeError("no specialists to merge: give at least one specialist")
        self.theta0 = as_source(pretrained, "pretrained")
        self.specialists = [as_source(s, f"specialist[{i}]") for i, s in enumerate(specialists)]
        self.runtime = runtime or Runtime()
        self.plan = self._make_plan()
        self._slots: list[torch.Tensor] | None = None

    @property
    def n(self) -> int:
        return len(self.specialists)

    @property
    def merged(self) -> list[TensorPlan]:
        return [p for p in self.plan if p.kind == "merge"]

    def _make_plan(self) -> list[TensorPlan]:
        t0 = self.theta0
        base_keys = [k for k in t0.keys() if k not in HEAD_KEYS]
        first = self.specialists[0]
        has_head = [k for k in HEAD_KEYS if k in first.keys()]
        expected = set(base_keys) | set(has_head)
        for s in self.specialists:
            keys = set(s.keys())
            missing = sorted(expected - keys)
            if missing:
                where = "the first specialist" if missing[0] in HEAD_KEYS else t0.name
                raise MergeError(f"{s.name}: missing key '{missing[0]}' (present in {where})")
            extra = sorted(keys - expected)
            if extra:
                raise MergeError(f"{s.name}: key '{extra[0]}' is not in {t0.name}")
        plan = []
        for key in first.keys():
            shape0 = t0.shape(key) if key in base_keys else first.shape(key)
            dtype0 = t0.dtype(key) if key in base_keys else first.dtype(key)
            for s in self.specialists:
                if s.shape(key) != shape0:
                    ref = t0.name if key in base_keys else first.name
                    raise MergeError(f"{s.name}: key '{key}' has shape {s.shape(key)}, {ref} has {shape0}")
            dtypes = [s.dtype(key) for s in self.specialists]
            if key in HEAD_KEYS or dtype0.is_floating_point:
                for s, d in zip(self.specialists, dtypes):
                    if not d.is_floating_point:
                        raise MergeError(f"{s.name}: key '{key}' is {d}, expected a floating-point tensor")
                if key in HEAD_KEYS:
                    plan.append(TensorPlan(key, shape0, _out_dtype(dtypes), "head"))
                elif STATISTIC.search(key):
                    plan.append(TensorPlan(key, shape0, _out_dtype(dtypes), "statistic"))
                else:
                    plan.append(TensorPlan(key, shape0, _out_dtype(dtypes), "merge", matrix_blocks(key, shape0)))
            else:
                for s, d in zip(self.specialists, dtypes):
                    if d != dtype0:
                        raise MergeError(f"{s.name}: key '{key}' is {d}, {t0.name} has {dtype0}")
                plan.append(TensorPlan(key, shape0, dtype0, "copy"))
        return plan

    # -- reading ---------------------------------------------------------------------------

    def _slot(self, j: int, numel: int) -> torch.Tensor:
        """Reusable (N+1)×numel float32 buffers, two slots (double buffering for the prefetch):
        fresh 100 MB allocations per key would be page-faulted in again every time."""
        if self._slots is None:
            largest = max((p.numel for p in self.merged), default=0)
            self._slots = [torch.empty((self.n + 1) * largest, dtype=torch.float32) for _ in range(2)]
        return self._slots[j % 2][: (self.n + 1) * numel].view(self.n + 1, numel)

    def _load(self, p: TensorPlan, with_theta0: bool, j: int = 0) -> tuple[torch.Tensor | None, torch.Tensor]:
        buf = self._slot(j, p.numel)
        stack = buf[1:]
        for i, s in enumerate(self.specialists):
            read_into(s, p.key, stack[i])
        theta0 = None
        if with_theta0:
            theta0 = buf[0]
            read_into(self.theta0, p.key, theta0)
        return theta0, stack

    def require_finite(self, key: str, value: torch.Tensor) -> None:
        """NaN/Inf in any input propagate into sums, differences and Gram matrices, so methods check
        one small result per key (a contiguous reduction) and only then re-read the key to name
        the file at fault."""
        if math.isfinite(float(value.sum())):
            return
        for s in (*self.specialists, self.theta0):
            if not bool(torch.isfinite(s.get(key).float()).all()):
                raise MergeError(f"{s.name}: key '{key}' holds NaN or Inf values")
        raise MergeError(f"key '{key}': merged values overflow the floating-point range")

    def stream(self, with_theta0: bool = True, desc: str = "merge") -> Iterator[tuple[TensorPlan, torch.Tensor | None, torch.Tensor]]:
        """Yield (plan, θ0 flat fp32, specialists N×numel fp32) for every merged key, in order.

        Both tensors live in a reused buffer: the consumer may modify them in place, and must
        not keep them (or views of them) beyond the next iteration."""
        keys = self.merged
        bar = tqdm(keys, desc=desc, disable=not self.runtime.progress, leave=False)
        if not self.runtime.prefetch:
            for p in bar:
                yield (p, *self._load(p, with_theta0))
            return
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self._load, keys[0], with_theta0, 0) if keys else None
            for j, p in enumerate(bar):
                loaded = pending.result()
                pending = pool.submit(self._load, keys[j + 1], with_theta0, j + 1) if j + 1 < len(keys) else None
                yield (p, *loaded)
                del loaded

    def mean_head(self, key: str) -> torch.Tensor:
        """B.1: the averaged specialists' head φ̄ = (1/N) Σ φ_i (float64 sum, exact for N = 1)."""
        total = torch.zeros(self.plan_of(key).shape, dtype=torch.float64)
        for s in self.specialists:
            t = s.get(key)
            if not bool(torch.isfinite(t).all()):
                raise MergeError(f"{s.name}: key '{key}' holds NaN or Inf values")
            total += t
        return total / self.n

    def plan_of(self, key: str) -> TensorPlan:
        return next(p for p in self.plan if p.key == key)

    # -- writing ---------------------------------------------------------------------------

    def layout(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        return [(p.key, p.shape, p.dtype) for p in self.plan]

    def sink(self, sink: Sink | None = None) -> Sink:
        """The given sink, else the runtime's, else a new in-memory one."""
        return sink or self.runtime.sink or DictSink(self.layout())

    def write(self, merged: Callable[[TensorPlan, torch.Tensor, torch.Tensor], torch.Tensor], with_theta0: bool = True, desc: str = "merge", sink: Sink | None = None) -> Sink:
        """Emit every key in plan order: `merged(plan, θ0, stack)` for merged keys (inputs streamed),
        the rest as `emit` does. Returns the sink."""
        stream = self.stream(with_theta0, desc)

        def one(p: TensorPlan) -> torch.Tensor:
            q, theta0, stack = next(stream)
            assert q is p
            return merged(p, theta0, stack)

        sink = self.emit(one, sink)
        for _ in stream:  # pragma: no cover - exhausts the generator (closes the prefetch pool)
            pass
        return sink

    def emit(self, merged: Callable[[TensorPlan], torch.Tensor], sink: Sink | None = None) -> Sink:
        """Every key in plan order: `merged(plan)` for merged keys (finite-checked), mean heads,
        θ0 copies for non-floating keys. The one place that decides what each plan kind gets."""
        sink = self.sink(sink)
        for p in self.plan:
            if p.kind == "merge":
                out = merged(p)
                self.require_finite(p.key, out)
                sink.put(p.key, out.reshape(p.shape))
            elif p.kind in ("head", "statistic"):
                given = self.runtime.averaged
                sink.put(p.key, given[p.key] if given is not None else self.mean_head(p.key))
            else:
                sink.put(p.key, self.theta0.get(p.key))
        return sink

    def result(self, method: str, hparams: dict, sink: Sink, diagnostics: dict) -> MergeResult:
        state = sink.tensors if isinstance(sink, DictSink) else None
        return MergeResult(method, dict(hparams), state, diagnostics)

    def new_scratch(self) -> Scratch:
        """A further scratch of the runtime's kind (a `DiskScratch` in the same folder, else memory);
        the caller closes it."""
        s = self.runtime.scratch
        return DiskScratch(s.directory) if isinstance(s, DiskScratch) else MemoryScratch()


def check_choice(method: str, name: str, value, choices: Sequence) -> None:
    """A method's option must be one of its readings, else a MergeError naming both."""
    if value not in choices:
        raise MergeError(f"{method}: {name} must be " + " or ".join(repr(c) for c in choices) + f", got {value!r}")


def check_ratio(method: str, name: str, value: float) -> None:
    """A fraction (rank ratio, top-p) must be in (0, 1]."""
    if not 0 < value <= 1:
        raise MergeError(f"{method}: {name} must be in (0, 1], got {value}")


def read_into(source: TensorSource, key: str, out: torch.Tensor) -> None:
    """Fill a flat float32 row with one tensor (straight from the file when it is float32)."""
    direct = getattr(source, "read_into", None)
    if direct is not None and source.dtype(key) == torch.float32:
        direct(key, out)
    else:
        out.copy_(source.get(key).reshape(-1))


def task_vectors(theta0: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
    """τ_i = θ_i − θ0, row-wise (eq. 1's rows), computed in place in the streamed buffer."""
    return stack.sub_(theta0)


def centred(tau: torch.Tensor) -> torch.Tensor:
    """δ_i = τ_i − τ̄ (§3.1), in place. For N = 2 written as ±(τ_1 − τ_2)/2 so that δ_2 = −δ_1 bitwise."""
    if tau.shape[0] == 2:
        half = (tau[0] - tau[1]) * 0.5
        tau[0] = half
        torch.neg(half, out=tau[1])
        return tau
    return tau.sub_(tau.mean(0))


def row_sum(rows: torch.Tensor) -> torch.Tensor:
    """Σ_i rows_i (one vectorised reduction over the specialists)."""
    return rows.sum(0)


def weight_mean(stack: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """θ_avg = θ_1 + (1/N) Σ_i (θ_i − θ_1) = (1/N) Σ_i θ_i: exact for N = 1 and identical specialists.

    `inplace=True` reuses the streamed buffer for the differences (rows 2..N are overwritten)."""
    first = stack[0]
    if stack.shape[0] == 1:
        return first.clone()
    diffs = stack[1:].sub_(first) if inplace else stack[1:] - first
    return diffs.sum(0).div_(stack.shape[0]).add_(first)
