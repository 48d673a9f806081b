"""One registry: each merge method declares, once, its name, its function, its parameters (default,
tuning grid, allowed choices) and how its grid is evaluated. Everything else reads it: the
`merge:` section of params.yaml is `{method, parameters, grid, baselines, ...}` validated here
(`plan`), `r2m merge` maps its flags onto the declared parameters, and `select` sweeps the
declared grid. No caller needs to know which method it runs.

Grids follow the paper's §4 tuning protocol: internal-composition knobs (TIES p, CART r, R²M r)
over {0.1, 0.3, 0.5, 0.7}; global magnitude scalars (TA λ, CART η) over {0.5, 1.0}; R²M's α over
{0.4, 0.5, 0.6}. Options that choose a reading of the paper (form, core, eta_mode) are not tuned
unless params.yaml's `merge.grid` names them. params.yaml may widen any grid (docs/method.md).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

from r2m.errors import ConfigError, MergeError
from r2m.merging.cart import cart
from r2m.merging.hierarchy import hierarchical_points
from r2m.merging.r2m import CORES, ETA_MODES, r2m, r2m_points
from r2m.merging.stream import DiskScratch
from r2m.merging.ta import task_arithmetic
from r2m.merging.taskvectors import MergeResult, Runtime, TaskVectors
from r2m.merging.ties import ties
from r2m.merging.wa import weight_average

RANKS = (0.1, 0.3, 0.5, 0.7)
MAGNITUDES = (0.5, 1.0)
ALPHAS = (0.4, 0.5, 0.6)

# evaluates many grid points of one method over the same inputs, sharing what the math allows
PointsFn = Callable[[Any, Sequence, Sequence[dict], Runtime], Iterator[tuple[dict, MergeResult]]]


@dataclass(frozen=True)
class HParam:
    default: Any
    grid: tuple = ()  # values swept by the selection helper (empty: fixed at the default)
    choices: tuple = ()  # allowed values of an option
    help: str = ""
    kind: type = float  # float, int or str: what a value from params.yaml or a flag must be


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable[..., MergeResult]
    hparams: dict[str, HParam] = field(default_factory=dict)
    title: str = ""
    points: PointsFn | None = None  # a whole grid from one shared analysis (else one merge per point)
    scratch: bool = False  # streams through disk scratch: merge_files gives it a DiskScratch beside the output
    same_for_one: bool = False  # every grid point of one specialist is that specialist: nothing to choose
    hierarchical: Callable | None = None  # grid points of the two-level merge over groups (None: flat only)

    def declared_grid(self) -> dict[str, tuple]:
        """The axes this method tunes by default, and their values."""
        return {k: tuple(h.grid) for k, h in self.hparams.items() if h.grid}

    def grid(self, overrides: Mapping[str, Sequence] | None = None) -> list[dict]:
        """Every combination of the tuned hyperparameters (others at their defaults)."""
        overrides = overrides or {}
        axes = {k: tuple(overrides.get(k, h.grid)) or (h.default,) for k, h in self.hparams.items()}
        return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]

    def resolve(self, given: Mapping) -> dict:
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

    def run_points(self, pretrained, specialists: Sequence, points: Sequence[dict],
                   runtime: Runtime | None = None, hierarchy: Mapping | None = None) -> Iterator[tuple[dict, MergeResult]]:
        """Each point's merge in memory, sharing work where the method can. `hierarchy` (keyword
        arguments of `r2m.merging.hierarchy.hierarchical_points`: grouping, level1, cache, ...)
        makes each point the two-level merge over groups."""
        if hierarchy is not None:
            if self.hierarchical is None:
                raise MergeError(f"method '{self.name}' has no hierarchical form (R²M has)")
            yield from self.hierarchical(pretrained, specialists, points=points, runtime=runtime, **hierarchy)
            return
        if self.points is not None:
            yield from self.points(pretrained, specialists, points, runtime or Runtime())
            return
        for hp in points:
            yield hp, self.fn(pretrained, specialists, runtime=runtime, **hp)


def _r2m_points(pretrained, specialists: Sequence, points: Sequence[dict], runtime: Runtime) -> Iterator[tuple[dict, MergeResult]]:
    """R²M's whole grid from ONE analysis (`r2m.r2m_points`), composed from disk scratch (a
    temporary `DiskScratch` unless the runtime brings one), so memory stays one merged model."""
    own = runtime.scratch is None
    if own:
        runtime = Runtime(**{**runtime.__dict__, "scratch": DiskScratch()})
    order = sorted(points, key=lambda h: (h["rank"], h["k"], h["core"]))  # stable: α varies fastest
    try:
        yield from r2m_points(TaskVectors(pretrained, specialists, runtime), order)
    finally:
        if own:
            runtime.scratch.close()


METHODS: dict[str, MethodSpec] = {
    "wa": MethodSpec("wa", weight_average, {}, "weight averaging", same_for_one=True),
    "ta": MethodSpec(
        "ta",
        task_arithmetic,
        {
            "lam": HParam(0.5, MAGNITUDES, help="λ in θ0 + λ Σ τ_i"),
            "form": HParam("sum", (), ("sum", "mean"), "sum: original; mean: paper B.1", str),
        },
        "task arithmetic",
    ),
    "ties": MethodSpec(
        "ties",
        ties,
        {
            "top_p": HParam(0.2, RANKS, help="fraction of |τ_i| kept (global top-p)"),
            "lam": HParam(1.0, (), help="λ in θ0 + λ · merged"),
            "form": HParam("official", (), ("official", "sum"), "official: disjoint mean; sum: paper B.1", str),
        },
        "TIES-merging",
    ),
    "cart": MethodSpec(
        "cart",
        cart,
        {
            "eta": HParam(1.0, MAGNITUDES, help="η, the scale in θ_avg + η Σ SVD_r(τ_i − τ̄)"),
            "rank": HParam(0.1, RANKS, help="rank ratio r"),
            "form": HParam("sum", (), ("sum", "mean"), "sum: official code; mean: a reading of B.1", str),
        },
        "CART",
    ),
    "r2m": MethodSpec(
        "r2m",
        r2m,
        {
            "alpha": HParam(0.5, ALPHAS, help="α in η = α‖τ_core‖/‖τ_res‖"),
            "rank": HParam(0.7, RANKS, help="residual rank ratio r"),
            "k": HParam(1, (), help="rank of the Real core", kind=int),
            "eta_mode": HParam("normalized", (), ETA_MODES, "how η is formed: normalized (§4 η_eff) | literal (eq. 6)", str),
            "core": HParam("centered", (), CORES, "SVD of M_c (eq. 2) or of M (intro)", str),
        },
        "R²M",
        points=_r2m_points,
        scratch=True,
        same_for_one=True,
        hierarchical=hierarchical_points,
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


# -- params.yaml's merge section, validated against the declarations -------------------------------

@dataclass(frozen=True)
class MergePlan:
    """What params.yaml asks for, checked: the candidate's method with its parameters and the
    grid selection sweeps, and the baselines (each with its declared defaults and grid)."""

    method: MethodSpec
    parameters: dict  # the method's parameters: declared defaults overridden by `merge.parameters`
    grid: dict[str, tuple]  # the axes selection sweeps (declared grid overridden by `merge.grid`)
    baselines: tuple[MethodSpec, ...]
    select: bool
    hierarchy: str | dict[str, str] = "none"  # none | family | {generator: group}

    def points(self) -> list[dict]:
        """Every grid point, complete (fixed parameters filled in)."""
        fixed = {k: v for k, v in self.parameters.items() if k not in self.grid}
        return [self.method.resolve({**p, **fixed}) for p in self.method.grid(self.grid)]


def _check_value(method: str, key: str, h: HParam, value, where: str):
    if h.kind is str:
        ok = isinstance(value, str)
    elif h.kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise ConfigError(f"params.yaml {where}: {value!r} is not a {h.kind.__name__} (method '{method}', {h.help})")
    if h.choices and value not in h.choices:
        raise ConfigError(f"params.yaml {where}: {value!r} is not one of {', '.join(map(str, h.choices))}")
    return float(value) if h.kind is float else value


def plan(cfg) -> MergePlan:
    """`merge:` of params.yaml (`r2m.config.MergeConfig`) against the declarations; a
    `ConfigError` names the key at fault (unknown method, parameter, choice or baseline)."""
    if cfg.method not in METHODS:
        raise ConfigError(f"params.yaml merge.method: unknown method '{cfg.method}' (choose from {', '.join(METHODS)})")
    spec = METHODS[cfg.method]
    parameters = {k: h.default for k, h in spec.hparams.items()}
    for key, value in cfg.parameters.items():
        if key not in spec.hparams:
            raise ConfigError(f"params.yaml merge.parameters.{key}: method '{spec.name}' has no such parameter "
                              f"(has: {', '.join(spec.hparams) or 'none'})")
        parameters[key] = _check_value(spec.name, key, spec.hparams[key], value, f"merge.parameters.{key}")
    grid = spec.declared_grid()
    for key, values in cfg.grid.items():
        if key not in spec.hparams:
            raise ConfigError(f"params.yaml merge.grid.{key}: method '{spec.name}' has no such parameter "
                              f"(has: {', '.join(spec.hparams) or 'none'})")
        if not values:
            raise ConfigError(f"params.yaml merge.grid.{key}: give at least one value")
        grid[key] = tuple(_check_value(spec.name, key, spec.hparams[key], v, f"merge.grid.{key}") for v in values)
    baselines = []
    for name in cfg.baselines:
        if name not in METHODS:
            raise ConfigError(f"params.yaml merge.baselines: unknown method '{name}' (choose from {', '.join(METHODS)})")
        if name != spec.name:
            baselines.append(METHODS[name])
    hierarchy = cfg.hierarchy
    if hierarchy != "none" and spec.hierarchical is None:
        raise ConfigError(f"params.yaml merge.hierarchy: method '{spec.name}' has no hierarchical form (r2m has)")
    if isinstance(hierarchy, str) and hierarchy not in ("none", "family"):
        raise ConfigError(f"params.yaml merge.hierarchy: {hierarchy!r} is not none, family or a mapping generator -> group")
    return MergePlan(spec, parameters, grid, tuple(baselines), cfg.select, hierarchy)


__all__ = ["METHODS", "HParam", "MergePlan", "MethodSpec", "get_method", "merge", "plan"]
