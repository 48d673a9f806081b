"""Merge rules for convolutional backbones (docs/method.md, "R²M", decision 2): pointwise 1×1 convs are truncated as [out, in]
matrices, depthwise convs and norms are left as they are, BatchNorm running statistics are
averaged like the head — against dense references, and on the real EfficientNet-Lite tower."""

from __future__ import annotations

import math

import torch

from r2m.merging import cart, r2m, ties, weight_average
from r2m.merging.taskvectors import STATISTIC, TaskVectors, matrix_blocks
from test_merging_methods import dense_truncate

PW = "backbone.trunk.blocks.1.0.conv_pw.weight"  # expansion 1×1 conv
PWL = "backbone.trunk.blocks.1.0.conv_pwl.weight"  # projection 1×1 conv
SE = "backbone.trunk.blocks.1.0.se.conv_reduce.weight"  # squeeze-excitation FC as a 1×1 conv
DW = "backbone.trunk.blocks.1.0.conv_dw.weight"  # depthwise 3×3
STEM = "backbone.trunk.conv_stem.weight"  # 3×3 conv with 3 input channels
BN_W, BN_B = "backbone.trunk.blocks.1.0.bn1.weight", "backbone.trunk.blocks.1.0.bn1.bias"
BN_MEAN, BN_VAR = "backbone.trunk.blocks.1.0.bn1.running_mean", "backbone.trunk.blocks.1.0.bn1.running_var"
BN_COUNT = "backbone.trunk.blocks.1.0.bn1.num_batches_tracked"


def conv_model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        STEM: torch.randn(6, 3, 3, 3, generator=g),
        PW: torch.randn(12, 6, 1, 1, generator=g),
        DW: torch.randn(12, 1, 3, 3, generator=g),
        SE: torch.randn(4, 12, 1, 1, generator=g),
        PWL: torch.randn(6, 12, 1, 1, generator=g),
        BN_W: torch.rand(12, generator=g) + 0.5,
        BN_B: torch.randn(12, generator=g),
        BN_MEAN: torch.randn(12, generator=g),
        BN_VAR: torch.rand(12, generator=g) + 0.1,
        BN_COUNT: torch.tensor(100),
    }


def conv_specialists(theta0: dict, n: int, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        s = {}
        for k, v in theta0.items():
            if not v.is_floating_point():
                s[k] = v + 7  # fine-tuning counted batches: copied from θ0 in every merge
            elif STATISTIC.search(k):
                s[k] = (v + 0.3 * torch.randn(v.shape, generator=g)).abs()  # a specialist's own statistics
            else:
                s[k] = v + 0.1 * torch.randn(v.shape, generator=g)
        s["head.weight"] = torch.randn(2, 6, generator=g)
        s["head.bias"] = torch.randn(2, generator=g)
        out.append(s)
    return out


def test_which_tensors_are_truncated():
    m = conv_model()
    assert [k for k in m if matrix_blocks(k, tuple(m[k].shape))] == [PW, SE, PWL]
    plan = {p.key: p for p in TaskVectors(m, conv_specialists(m, 2)).plan}
    assert plan[PW].matrix_shape == (12, 6) and plan[SE].matrix_shape == (4, 12)
    assert plan[BN_MEAN].kind == plan[BN_VAR].kind == "statistic"
    assert plan[BN_W].kind == plan[DW].kind == "merge" and plan[DW].blocks == 0
    assert plan[BN_COUNT].kind == "copy"


def dense_conv_r2m(theta0: dict, specs: list[dict], alpha: float, r: float) -> dict:
    """docs/method.md's R²M materialised in float64 over the learned tensors (statistics excluded from M)."""
    keys = [k for k in theta0 if theta0[k].is_floating_point() and not STATISTIC.search(k)]
    n = len(specs)
    taus = {k: [s[k].double() - theta0[k].double() for s in specs] for k in keys}
    rows = torch.stack([torch.cat([taus[k][i].reshape(-1) for k in keys]) for i in range(n)])
    tau_bar = rows.mean(0)
    _, _, vh = torch.linalg.svd(rows - tau_bar, full_matrices=False)
    tau_core = vh[:1].T @ (vh[:1] @ tau_bar)
    deltas = [torch.cat([dense_truncate(k, taus[k][i] - sum(taus[k]) / n, r).reshape(-1) for k in keys]) for i in range(n)]
    norms = torch.stack([d.norm() for d in deltas])
    tau_res = sum(norms.mean() * d / (nd + 1e-8) for d, nd in zip(deltas, norms)) / n
    eta = alpha * tau_core.norm() / tau_res.norm()
    flat = torch.cat([theta0[k].double().reshape(-1) for k in keys]) + tau_core + eta * tau_res
    out, offset = {}, 0
    for k in keys:
        out[k] = flat[offset : offset + theta0[k].numel()].reshape(theta0[k].shape)
        offset += theta0[k].numel()
    return out


def _check_statistics_and_copies(out: dict, theta0: dict, specs: list[dict]) -> None:
    for key in (BN_MEAN, BN_VAR, "head.weight", "head.bias"):
        assert torch.allclose(out[key], torch.stack([s[key] for s in specs]).mean(0), atol=1e-6), key
    assert torch.equal(out[BN_COUNT], theta0[BN_COUNT])


def test_r2m_on_a_conv_backbone_matches_dense_reference():
    theta0 = conv_model()
    specs = conv_specialists(theta0, 4)
    out = r2m(theta0, specs, alpha=0.5, rank=0.5).state_dict
    for key, value in dense_conv_r2m(theta0, specs, 0.5, 0.5).items():
        assert torch.allclose(out[key].double(), value, atol=2e-5), key
    _check_statistics_and_copies(out, theta0, specs)


def test_cart_on_a_conv_backbone_matches_dense_reference():
    theta0 = conv_model(3)
    specs = conv_specialists(theta0, 3, seed=5)
    out = cart(theta0, specs, eta=0.7, rank=0.5).state_dict
    for key, value in theta0.items():
        if not value.is_floating_point() or STATISTIC.search(key):
            continue
        taus = [s[key].double() - value.double() for s in specs]
        mean = sum(taus) / 3
        expected = value.double() + mean
        if matrix_blocks(key, tuple(value.shape)):
            expected = expected + 0.7 * sum(dense_truncate(key, t - mean, 0.5) for t in taus)
        assert torch.allclose(out[key].double(), expected, atol=1e-5), key
    _check_statistics_and_copies(out, theta0, specs)


def test_statistics_never_enter_ties_or_become_negative():
    theta0 = conv_model(1)
    specs = conv_specialists(theta0, 3, seed=2)
    for result in (ties(theta0, specs, top_p=0.2, lam=1.0), weight_average(theta0, specs)):
        out = result.state_dict
        _check_statistics_and_copies(out, theta0, specs)
        assert bool((out[BN_VAR] > 0).all())


def test_efficientnet_tower_plan():
    """The embedded default's tower: which of its tensors each rule reads (timm key names)."""
    from r2m.config import ModelConfig
    from r2m.models.detector import build_detector

    tensors = build_detector(ModelConfig(name="r2m-efficientnet-lite0")).checkpoint_tensors()
    plan = TaskVectors(tensors, [tensors]).plan
    truncated = [p.key for p in plan if p.blocks]
    assert truncated and all(".conv_pw" in k or ".conv_pwl" in k or k.endswith("conv_head.weight") for k in truncated)
    assert not any("conv_dw" in k or "conv_stem" in k for k in truncated)
    stats = [p.key for p in plan if p.kind == "statistic"]
    assert len(stats) == 2 * sum(1 for k in tensors if k.endswith("num_batches_tracked"))
    assert math.prod(next(p for p in plan if p.key.endswith("conv_head.weight")).matrix_shape) == 320 * 1280
