"""One registry: method name → function + hyperparameter schema (defaults, tuning grid).

Grids follow the paper's §4 tuning protocol: internal-composition knobs (TIES p, CART r, R²M r)
over {0.1, 0.3, 0.5, 0.7}; global magnitude scalars (TA λ, CART η) over {0.5, 1.0}; R²M's α over
{0.4, 0.5, 0.6}. Options that choose a reading of the paper (form, core, eta_mode) are not tuned.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from r2m.errors import MergeError
from r2m.merging.cart import cart
from r2m.merging.r2m import r2m
from r2m.merging.ta import task_arithmetic
from r2m.merging.taskvectors import MergeResult, Runtime
from r2m.merging.ties import ties
from r2m.merging.wa import weight_average

RANKS = (0.1, 0.3, 0.5, 0.7)
MAGNITUDES = (0.5, 1.0)
ALPHAS = (0.4, 0.5, 0.6)


@dataclass(frozen=True)
class HParam:
    default: Any
    grid: tuple = ()  # values swept by the selection helper (empty: fixed at the default)
    choices: tuple = ()  # allowed values of an option
    help: str = ""


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable[..., MergeResult]
    hparams: dict[str, HParam] = field(default_factory=dict)
    title: str = ""

    def grid(self, overrides: dict[str, Sequence] | None = None) -> list[dict]:
        """Every combination of the tuned hyperparameters (others at their defaults)."""
        overrides = overrides or {}
        axes = {k: tuple(overrides.get(k, h.grid)) or (h.default,) for k, h in self.hparams.items()}
        return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]

    def resolve(self, given: dict) -> dict:
        """Defaults filled in, unknown names and bad choices rejected."""
        unknown = sorted(set(given) - set(self.hparams))
        if unknown:
            raise MergeError(f"method '{self.name}' has no hyperparameter '{unknown[0]}' (has: {', '.join(self.hparams) or 'none'})")
        out = {k: h.default for k, h in self.hparams.items()}
        out.update({k: v for k, v in given.items() if v is not None})
        for k, h in self.hparams.items():
            if h.choices and out[k] not in h.choices:
                raise MergeError(f"method '{self.name}': {k} must be one of {', '.join(map(str, h.choices))}, got {out[k]!r}")
        return out


METHODS: dict[str, MethodSpec] = {
    "wa": MethodSpec("wa", weight_average, {}, "weight averaging"),
    "ta": MethodSpec(
        "ta",
        task_arithmetic,
        {
            "lam": HParam(0.5, MAGNITUDES, help="λ in θ0 + λ Σ τ_i"),
            "form": HParam("sum", (), ("sum", "mean"), "sum: original; mean: paper B.1"),
        },
        "task arithmetic",
    ),
    "ties": MethodSpec(
        "ties",
        ties,
        {
            "top_p": HParam(0.2, RANKS, help="fraction of |τ_i| kept (global top-p)"),
            "lam": HParam(1.0, (), help="λ in θ0 + λ · merged"),
            "form": HParam("official", (), ("official", "sum"), "official: disjoint mean; sum: paper B.1"),
        },
        "TIES-merging",
    ),
    "cart": MethodSpec(
        "cart",
        cart,
        {
            "eta": HParam(1.0, MAGNITUDES, help="η in θ_avg + η Σ SVD_r(τ_i − τ̄)"),
            "rank": HParam(0.1, RANKS, help="rank ratio r"),
            "form": HParam("sum", (), ("sum", "mean"), "sum: official code; mean: a reading of B.1"),
        },
        "CART",
    ),
    "r2m": MethodSpec(
        "r2m",
        r2m,
        {
            "alpha": HParam(0.5, ALPHAS, help="α in η = α‖τ_core‖/‖τ_res‖"),
            "rank": HParam(0.7, RANKS, help="residual rank ratio r"),
            "k": HParam(1, (), help="rank of the Real core"),
            "eta_mode": HParam("normalized", (), ("normalized", "literal"), "normalized: §4 η_eff; literal: eq. 6"),
            "core": HParam("centered", (), ("centered", "uncentered"), "SVD of M_c (eq. 2) or of M (intro)"),
        },
        "R²M",
    ),
}


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise MergeError(f"unknown merge method '{name}' (choose from {', '.join(METHODS)})")
    return METHODS[name]


def merge(method: str, pretrained, specialists: Sequence, *, runtime: Runtime | None = None, **hparams) -> MergeResult:
    """Run a registered method with its defaults filled in."""
    spec = get_method(method)
    return spec.fn(pretrained, specialists, runtime=runtime, **spec.resolve(hparams))
