"""R²M against a dense direct implementation (full SVD of the materialised M_c), and its guards."""

from __future__ import annotations

import math

import pytest
import torch

from r2m.merging import DiskScratch, Runtime, r2m, weight_average
from r2m.merging.linalg import truncate_blocks
from test_merging_methods import POS, dense_truncate, random_model, specialists_of


def dense_r2m(theta0: dict, specs: list[dict], alpha: float, r: float, k: int = 1, eta_mode: str = "normalized", core: str = "centered") -> tuple[dict, dict]:
    """docs/method.md's R²M with everything materialised in float64: M (N×D), full SVD, dense truncations."""
    keys = [key for key in theta0 if theta0[key].is_floating_point()]
    n = len(specs)
    taus = {key: [s[key].double() - theta0[key].double() for s in specs] for key in keys}
    m_rows = torch.stack([torch.cat([taus[key][i].reshape(-1) for key in keys]) for i in range(n)])
    tau_bar = m_rows.mean(0)
    mat = m_rows - tau_bar if core == "centered" else m_rows
    _, sigma, vh = torch.linalg.svd(mat, full_matrices=False)
    v = vh[:k]
    tau_core = v.T @ (v @ tau_bar)  # eq. 3
    deltas = [torch.cat([dense_truncate(key, taus[key][i] - sum(taus[key]) / n, r).reshape(-1) for key in keys]) for i in range(n)]
    norms = torch.stack([d.norm() for d in deltas])
    m = norms.mean()
    tau_res = sum(m * d / (nd + 1e-8) for d, nd in zip(deltas, norms)) / n  # eqs. 4-5
    eta = alpha * tau_core.norm() / tau_res.norm() if eta_mode == "normalized" else alpha * tau_core.norm()
    flat = torch.cat([theta0[key].double().reshape(-1) for key in keys]) + tau_core + eta * tau_res  # eq. 6
    out, offset = {}, 0
    for key in keys:
        size = theta0[key].numel()
        out[key] = flat[offset : offset + size].reshape(theta0[key].shape)
        offset += size
    diag = {
        "singular_values": sigma,
        "tau_bar_norm": float(tau_bar.norm()),
        "core_ratio": float(tau_core.norm() / tau_bar.norm()),
        "cos_v_tau_bar": float((v[0] @ tau_bar).abs() / tau_bar.norm()),
        "residual_norm": float(tau_res.norm()),
        "eta": float(eta),
    }
    return out, diag


@pytest.mark.parametrize(
    "n,alpha,r,k,eta_mode,core",
    [
        (3, 0.5, 0.7, 1, "normalized", "centered"),
        (4, 0.4, 0.1, 1, "normalized", "centered"),
        (5, 0.6, 0.3, 2, "normalized", "centered"),
        (3, 0.5, 0.5, 1, "literal", "centered"),
        (4, 0.5, 0.7, 1, "normalized", "uncentered"),
    ],
)
def test_r2m_matches_dense_reference(n, alpha, r, k, eta_mode, core):
    theta0 = random_model(n, width=8)
    specs = specialists_of(theta0, n, seed=10 + n)
    result = r2m(theta0, specs, alpha=alpha, rank=r, k=k, eta_mode=eta_mode, core=core)
    expected, diag = dense_r2m(theta0, specs, alpha, r, k, eta_mode, core)
    out = result.state_dict
    for key, value in expected.items():
        assert torch.allclose(out[key].double(), value, atol=2e-5), key
    assert torch.equal(out[POS], theta0[POS])
    assert torch.allclose(out["head.weight"], torch.stack([s["head.weight"] for s in specs]).mean(0), atol=1e-6)
    d = result.diagnostics
    assert torch.allclose(torch.tensor(d["singular_values"][: len(diag["singular_values"])], dtype=torch.float64), diag["singular_values"], rtol=1e-5, atol=1e-7)
    for name in ("tau_bar_norm", "core_ratio", "cos_v_tau_bar", "residual_norm", "eta"):
        assert math.isclose(d[name], diag[name], rel_tol=1e-4), name
    assert d["other_core"]["core"] != core and d["degenerate"] is None


def test_identical_specialists_return_weight_averaging_exactly():
    theta0 = random_model(1)
    (spec,) = specialists_of(theta0, 1)
    result = r2m(theta0, [spec, spec, spec])
    wa = weight_average(theta0, [spec, spec, spec]).state_dict
    assert result.diagnostics["degenerate"] == "identical specialists"
    assert all(torch.equal(result.state_dict[key], wa[key]) and torch.equal(wa[key], spec[key]) for key in wa)
    assert result.method == "r2m" and result.hparams["alpha"] == 0.5


def test_two_specialists_have_zero_residual_and_keep_the_core():
    theta0 = random_model(2)
    specs = specialists_of(theta0, 2)
    result = r2m(theta0, specs, rank=0.5)
    d = result.diagnostics
    assert d["residual_zero"] and d["eta"] == 0.0 and d["residual_norm"] == 0.0  # δ_1 = −δ_2
    keys = [key for key in theta0 if theta0[key].is_floating_point()]
    # θ* = θ0 + τ_core with v ∝ τ_1 − τ_2
    tau = [torch.cat([(s[key].double() - theta0[key].double()).reshape(-1) for key in keys]) for s in specs]
    v = (tau[0] - tau[1]) / (tau[0] - tau[1]).norm()
    core = v * (v @ ((tau[0] + tau[1]) / 2))
    got = torch.cat([(result.state_dict[key].double() - theta0[key].double()).reshape(-1) for key in keys])
    assert torch.allclose(got, core, atol=1e-6)


def test_core_rank_guard_when_k_exceeds_the_rank_of_m_c():
    theta0 = random_model(3)
    specs = specialists_of(theta0, 3)
    result = r2m(theta0, specs, k=3)  # M_c of 3 rows has rank ≤ 2: σ_3 = 0 must be skipped
    d = result.diagnostics
    assert d["core_rank_used"] == 2 and d["singular_values"][2] < 1e-5 * d["singular_values"][0]
    assert all(torch.isfinite(t).all() for t in result.state_dict.values() if t.is_floating_point())


def test_qkv_thirds_are_truncated_separately():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(2, 3 * 8 * 8, generator=g)
    truncated, bases = truncate_blocks(delta, (24, 8), 3, 0.25, torch.device("cpu"))  # k = 2 per third
    assert len(bases) == 3 and all(b.high.shape == (2, 8, 2) for b in bases)  # one per third, both specialists
    for i in range(2):
        thirds = truncated[i].reshape(3, 8, 8)
        assert all(int(torch.linalg.matrix_rank(t, rtol=1e-5)) == 2 for t in thirds)
        whole = truncated[i].reshape(24, 8)
        assert int(torch.linalg.matrix_rank(whole, rtol=1e-5)) > 2  # not one rank-2 truncation of the 24×8 matrix


def test_disk_scratch_gives_the_same_merge(tmp_path):
    theta0 = random_model(4, width=8)
    specs = specialists_of(theta0, 4)
    scratch = DiskScratch(tmp_path)
    spilled = r2m(theta0, specs, rank=0.3, runtime=Runtime(scratch=scratch)).state_dict
    scratch.close()
    memory = r2m(theta0, specs, rank=0.3).state_dict
    assert all(torch.equal(spilled[key], memory[key]) for key in memory)
    assert not list(tmp_path.iterdir())


def test_diagnostics_are_reported_for_both_core_readings():
    theta0 = random_model(5)
    specs = specialists_of(theta0, 4)
    centred = r2m(theta0, specs).diagnostics
    uncentred = r2m(theta0, specs, core="uncentered").diagnostics
    assert math.isclose(centred["other_core"]["core_ratio"], uncentred["core_ratio"], rel_tol=1e-9)
    assert math.isclose(uncentred["other_core"]["cos_v_tau_bar"], centred["cos_v_tau_bar"], rel_tol=1e-9)
    assert 0 <= centred["cos_v_tau_bar"] <= 1 + 1e-9 and len(centred["singular_values"]) == 4
