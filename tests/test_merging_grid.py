"""Issue 14: the R²M selection grid from one analysis, and the exact truncation it relies on."""

from __future__ import annotations

import math

import pytest
import torch

from r2m.merging import METHODS, DictSource, DiskScratch, Runtime, r2m, select
from r2m.merging.linalg import eigenbases, truncate_blocks, truncation_rank
from r2m.merging.r2m import r2m_points
from r2m.merging.taskvectors import TaskVectors
from test_merging_methods import FC, random_model, specialists_of

GRID = {"alpha": (0.4, 0.5, 0.6), "rank": (0.1, 0.3, 0.5, 0.7), "core": ("centered", "uncentered")}


class CountingSource(DictSource):
    """A real DictSource that counts how often each key is read."""

    def __init__(self, tensors, name):
        super().__init__(tensors, name)
        self.reads: dict[str, int] = {}

    def get(self, key):
        self.reads[key] = self.reads.get(key, 0) + 1
        return super().get(key)


def _points():
    spec = METHODS["r2m"]
    return [spec.resolve(p) for p in spec.grid(GRID)]


def test_every_grid_point_is_bitwise_the_single_merge():
    theta0 = random_model(3, width=12)
    specs = specialists_of(theta0, 4, seed=5)
    points = _points()
    assert len(points) == 24
    grid = dict((tuple(sorted(hp.items())), res) for hp, res in r2m_points(TaskVectors(theta0, specs), points))
    assert len(grid) == 24
    for hp in points:
        got = grid[tuple(sorted(hp.items()))]
        single = r2m(theta0, specs, **hp)
        assert got.hparams == single.hparams == {k: hp[k] for k in ("alpha", "rank", "k", "core", "eta_mode")}
        for key, value in single.state_dict.items():
            assert torch.equal(got.state_dict[key], value), (hp, key)
        for name in ("eta", "residual_norm", "core_ratio", "cos_v_tau_bar", "singular_values", "residual_norms"):
            assert got.diagnostics[name] == single.diagnostics[name], (hp, name)
    # the grid really differs across its points (not one merge returned 24 times)
    first = grid[tuple(sorted(points[0].items()))].state_dict[FC]
    assert sum(not torch.equal(first, r.state_dict[FC]) for r in grid.values()) == 23


def test_one_analysis_reads_the_inputs_twice_for_the_whole_grid():
    theta0 = random_model(4, width=10)
    sources = [CountingSource(s, f"specialist[{i}]") for i, s in enumerate(specialists_of(theta0, 3, seed=2))]
    results = list(r2m_points(TaskVectors(theta0, sources), _points()))
    assert len(results) == 24
    for s in sources:
        merged_keys = {k: n for k, n in s.reads.items() if not k.startswith("head.")}
        assert merged_keys and set(merged_keys.values()) == {2}, merged_keys  # analyse + build, then no more
        assert set(v for k, v in s.reads.items() if k.startswith("head.")) == {24}  # the mean head per point


def per_point_selection(theta0, specs, score):
    """The selection it replaces: one full R²M merge per grid point, in select's order, first max wins."""
    order = sorted(_points(), key=lambda h: (h["rank"], h["k"], h["core"]))
    table, best = [], None
    for hp in order:
        result = r2m(theta0, specs, **hp)
        value = float(score(result.state_dict, hp))
        table.append({**hp, "score": value})
        if best is None or value > best[0]:
            best = (value, result)
    return best[1].hparams, best[0], table


def test_one_analysis_selection_picks_the_same_point_with_the_same_scores(tmp_path):
    theta0 = random_model(6, width=10)
    specs = specialists_of(theta0, 4, seed=7)
    target = specialists_of(theta0, 1, seed=99)[0]  # a held-out "validation" model: score = −distance to it

    def score(state, hp):
        return -sum(float((state[k].double() - target[k].double()).norm()) for k in state if k in target and state[k].is_floating_point() and not k.startswith("head."))

    chosen = select("r2m", theta0, specs, score, grid=GRID)
    hparams, best, table = per_point_selection(theta0, specs, score)
    assert chosen.best_hparams == hparams and chosen.best_score == best
    assert chosen.table == table and len(table) == 24
    assert len({row["score"] for row in table}) > 12  # the scores discriminate between points
    # with an on-disk scratch of the caller's, the same choice and nothing left behind
    scratch = DiskScratch(tmp_path)
    on_disk = select("r2m", theta0, specs, score, grid=GRID, runtime=Runtime(scratch=scratch))
    scratch.close()
    assert on_disk.table == table and not list(tmp_path.iterdir())


def test_a_failing_input_leaves_no_scratch_behind(tmp_path):
    theta0 = random_model(2, width=8)
    specs = specialists_of(theta0, 3)
    specs[2][FC][0, 0] = float("nan")
    scratch = DiskScratch(tmp_path)
    with pytest.raises(Exception, match=r"specialist\[2\]: key '.*c_fc.weight' holds NaN"):
        select("r2m", theta0, specs, lambda s, hp: 0.0, grid=GRID, runtime=Runtime(scratch=scratch))
    scratch.close()
    assert not list(tmp_path.iterdir())


# -- the truncation: the best rank-k approximation (Eckart–Young) to float32 tolerance ---------------

def _spectrum_matrix(m: int, n: int, sigma: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(sigma), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(sigma), generator=g, dtype=torch.float64))
    return (u * sigma) @ v.T


SPECTRA = {
    "flat": lambda p: torch.ones(p, dtype=torch.float64) + 0.01 * torch.arange(p, dtype=torch.float64).flip(0) / p,
    "geometric": lambda p: 0.93 ** torch.arange(p, dtype=torch.float64),
    "low-rank+noise": lambda p: torch.cat([torch.tensor([50.0, 30, 20, 10], dtype=torch.float64), 0.1 * torch.rand(p - 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.05]),
    "clustered": lambda p: torch.repeat_interleave(torch.tensor([8.0, 4, 2, 1], dtype=torch.float64), p // 4),
}


@pytest.mark.parametrize("spectrum", list(SPECTRA))
@pytest.mark.parametrize("shape", [(96, 64), (64, 96), (192, 64)])
def test_truncation_is_the_best_rank_k_approximation(spectrum, shape):
    m, n = shape
    p = min(shape)
    sigma = SPECTRA[spectrum](p).sort(descending=True).values
    w64 = _spectrum_matrix(m, n, sigma, seed=m + n)
    w = w64.float()
    sigma32 = torch.linalg.svdvals(w.double())  # the optimum for the float32 input actually given
    for r in (0.1, 0.3, 0.5, 0.7, 0.9):
        k = truncation_rank(shape, r)
        out, bases = truncate_blocks(w.reshape(1, -1).clone(), shape, 1, r, torch.device("cpu"))
        got = out.reshape(shape).double()
        best = float(sigma32[k:].square().sum().sqrt())
        err = float((w.double() - got).norm())
        # Eckart–Young: no rank-k matrix is closer; ours is within float32 rounding of the optimum
        assert err <= best * (1 + 1e-3) + 2e-6 * float(sigma32[0]) * math.sqrt(p), (spectrum, shape, r, err, best)
        assert int(torch.linalg.matrix_rank(got, rtol=1e-5)) <= k
        # and it is the projection onto the top-k singular subspace, not just some rank-k matrix
        u, _, vh = torch.linalg.svd(w.double(), full_matrices=False)
        if float(sigma32[k - 1] - sigma32[k]) > 1e-3 * float(sigma32[0]):
            ref = (u[:, :k] * sigma32[:k]) @ vh[:k]
            assert float((got - ref).norm()) <= 1e-4 * float(w.double().norm()), (spectrum, shape, r)


def test_the_accuracy_check_fails_for_a_wrong_subspace():
    """The criterion above is not vacuous: projecting onto the NEXT k singular vectors fails it."""
    shape, k = (96, 64), 19
    sigma = SPECTRA["geometric"](64)
    w = _spectrum_matrix(*shape, sigma, seed=1).float()
    sigma32 = torch.linalg.svdvals(w.double())
    _, bases = eigenbases(w[None], [k])
    u, _, vh = torch.linalg.svd(w.double(), full_matrices=False)
    wrong = w.double() @ vh[1 : k + 1].T @ vh[1 : k + 1]  # off by one singular direction
    best = float(sigma32[k:].square().sum().sqrt())
    assert float((w.double() - wrong).norm()) > best * (1 + 1e-3) + 2e-6 * float(sigma32[0]) * 8
    right = bases.project(w, 0, k).double()
    assert float((w.double() - right).norm()) <= best * (1 + 1e-3) + 2e-6 * float(sigma32[0]) * 8


def test_one_eigendecomposition_serves_every_rank_bitwise():
    """Also where some ranks of a matrix are certified in float32 and others need float64."""
    g = torch.Generator().manual_seed(0)
    steep = _spectrum_matrix(48, 32, 0.7 ** torch.arange(32, dtype=torch.float64), seed=5).float()  # tail below float32 at large k
    w = torch.cat([torch.randn(2, 48, 32, generator=g), steep[None]])
    ks = [truncation_rank((48, 32), r) for r in (0.1, 0.3, 0.5, 0.7)]
    kept, shared = eigenbases(w, ks)
    assert bool(shared.exact.any()) and not bool(shared.exact.all())  # both paths are exercised
    assert not bool(shared.exact[:2].any()) and bool(shared.exact[2, -1]) and not bool(shared.exact[2, 0])
    together = [shared.project_ranks(w[i], i, ks) for i in range(3)]  # what the grid's build pass calls
    for k in ks:
        kept_alone, alone = eigenbases(w, [k])
        assert torch.equal(kept[k], kept_alone[k])
        for i in range(3):
            assert torch.equal(shared.project(w[i], i, k), alone.project(w[i], i, k))
            assert torch.equal(together[i][k], alone.project(w[i], i, k))
    assert shared.high.shape[2] + shared.low.shape[2] < 32 + 32 // 2  # only the columns the ranks need
    assert shared.low64.shape[0] == 1  # float64 bases only for the matrix that needs them


def test_float32_is_kept_only_where_certified_and_the_fallback_is_needed(monkeypatch):
    """float32 eigh is kept for a resolvable spectrum; on a noise floor 500× below the top singular
    values it is not certified, and forcing it there misses the Eckart–Young optimum."""
    from r2m.merging import linalg

    shape, r = (96, 64), 0.7
    k = truncation_rank(shape, r)

    def bases_for(spectrum):
        w = _spectrum_matrix(*shape, SPECTRA[spectrum](64).sort(descending=True).values, seed=3).float()
        return w, eigenbases(w[None], [k])[1]

    _, flat = bases_for("flat")
    assert not bool(flat.exact[0, 0]) and flat.low64.shape[0] == 0
    w, floor = bases_for("low-rank+noise")
    assert bool(floor.exact[0, 0])
    sigma = torch.linalg.svdvals(w.double())
    limit = float(sigma[k:].square().sum().sqrt()) * (1 + 1e-3) + 2e-6 * float(sigma[0]) * 8  # the criterion above
    assert float((w.double() - floor.project(w, 0, k).double()).norm()) <= limit
    monkeypatch.setattr(linalg, "certified", lambda evals, k: torch.ones(evals.shape[0], dtype=torch.bool))
    _, forced = eigenbases(w[None], [k])
    assert not bool(forced.exact[0, 0])
    assert float((w.double() - forced.project(w, 0, k).double()).norm()) > limit


def test_nested_ranks_apply_each_top_column_once(monkeypatch):
    """The grid's ranks through the top basis (r = 0.1, 0.3, 0.5) share their prefix: the columns
    applied are those of the largest such rank, not their sum; the complement rank adds its own."""
    from r2m.merging.linalg import Eigenbases

    w = torch.randn(1, 96, 80, generator=torch.Generator().manual_seed(1))
    ks = [truncation_rank((96, 80), r) for r in (0.1, 0.3, 0.5, 0.7)]  # 8, 24, 40 (top) and 56 (complement: 24)
    _, bases = eigenbases(w, ks)
    applied = []
    real = Eigenbases._apply
    monkeypatch.setattr(Eigenbases, "_apply", lambda self, x, cols: applied.append(cols.shape[1]) or real(self, x, cols))
    bases.project_ranks(w[0], 0, ks)
    assert sum(applied) == 40 + (80 - 56)
    applied.clear()
    for k in ks:
        bases.project(w[0], 0, k)
    assert sum(applied) == 8 + 24 + 40 + 24  # one rank at a time applies every chunk again
