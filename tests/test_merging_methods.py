"""WA, TA, TIES, CART: hand-computed tiny cases, dense references, invariants, streaming."""

from __future__ import annotations

import torch
import pytest

from r2m.errors import MergeError
from r2m.merging import (
    METHODS,
    DictSink,
    Runtime,
    SafetensorsSink,
    SafetensorsSource,
    cart,
    merge,
    select,
    task_arithmetic,
    ties,
    weight_average,
)
from r2m.merging.linalg import truncation_rank
from r2m.merging.taskvectors import TaskVectors, matrix_blocks, weight_mean

QKV = "backbone.transformer.resblocks.0.attn.in_proj_weight"
OUT = "backbone.transformer.resblocks.0.attn.out_proj.weight"
FC = "backbone.transformer.resblocks.0.mlp.c_fc.weight"
PROJ = "backbone.transformer.resblocks.0.mlp.c_proj.weight"
LN = "backbone.transformer.resblocks.0.ln_1.weight"
POS = "backbone.position_ids"


def random_model(seed: int = 0, width: int = 6, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "backbone.class_embedding": torch.randn(width, generator=g).to(dtype),
        QKV: torch.randn(3 * width, width, generator=g).to(dtype),
        OUT: torch.randn(width, width, generator=g).to(dtype),
        LN: torch.randn(width, generator=g).to(dtype),
        FC: torch.randn(2 * width, width, generator=g).to(dtype),
        PROJ: torch.randn(width, 2 * width, generator=g).to(dtype),
        POS: torch.arange(4),
    }


def specialists_of(theta0: dict, n: int, scale: float = 0.1, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        s = {}
        for k, v in theta0.items():
            s[k] = (v.float() + scale * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v.clone()
        s["head.weight"] = torch.randn(2, theta0[LN].shape[0], generator=g)
        s["head.bias"] = torch.randn(2, generator=g)
        out.append(s)
    return out


# -- hand-computed tiny cases ------------------------------------------------------------------

def tiny():
    theta0 = {"w": torch.tensor([0.0, 0.0, 0.0, 0.0])}
    s1 = {"w": torch.tensor([1.0, -2.0, 0.5, 0.0]), "head.weight": torch.tensor([[1.0]]), "head.bias": torch.tensor([0.0])}
    s2 = {"w": torch.tensor([3.0, 1.0, -0.5, 0.1]), "head.weight": torch.tensor([[3.0]]), "head.bias": torch.tensor([2.0])}
    return theta0, [s1, s2]


def test_wa_hand_computed_and_heads_are_averaged():
    theta0, specs = tiny()
    out = weight_average(theta0, specs).state_dict
    assert torch.equal(out["w"], torch.tensor([2.0, -0.5, 0.0, 0.05]))
    assert torch.equal(out["head.weight"], torch.tensor([[2.0]]))
    assert torch.equal(out["head.bias"], torch.tensor([1.0]))


def test_ta_original_sum_and_b1_mean_forms():
    theta0, specs = tiny()
    theta0 = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0])}
    specs = [{**s, "w": s["w"] + 1} for s in specs]
    total = torch.tensor([4.0, -1.0, 0.0, 0.1])
    out = task_arithmetic(theta0, specs, lam=0.5).state_dict["w"]
    assert torch.allclose(out, 1 + 0.5 * total)
    out = task_arithmetic(theta0, specs, lam=0.5, form="mean").state_dict["w"]
    assert torch.allclose(out, 1 + 0.25 * total)
    assert torch.equal(task_arithmetic(theta0, specs).state_dict["head.bias"], torch.tensor([1.0]))


def test_ties_hand_computed():
    theta0 = {"w": torch.zeros(5)}
    t1 = torch.tensor([4.0, -1.0, 0.2, -3.0, 0.1])
    t2 = torch.tensor([-2.0, 2.0, 0.3, 1.0, 0.0])
    t3 = torch.tensor([1.0, -5.0, 0.4, -1.0, 0.0])
    specs = [{"w": t} for t in (t1, t2, t3)]
    # p = 0.6, D = 5: the official code keeps |τ| ≥ the k-th smallest, k = D − ⌊D·p⌋ = 2,
    # i.e. the top 4 entries of each task: t1 [4,-1,.2,-3,0], t2 [-2,2,.3,1,0], t3 [1,-5,.4,-1,0]
    # sums [3,-4,.9,-3,0] -> elected signs [+,-,+,-,0]
    # disjoint means: [(4+1)/2, (-1-5)/2, (.2+.3+.4)/3, (-3-1)/2, 0]
    expected = torch.tensor([2.5, -3.0, 0.3, -2.0, 0.0])
    out = ties(theta0, specs, top_p=0.6, lam=1.0).state_dict["w"]
    assert torch.allclose(out, expected)
    out = ties(theta0, specs, top_p=0.6, lam=0.5).state_dict["w"]
    assert torch.allclose(out, 0.5 * expected)
    # B.1 variant: θ_avg + Σ_i (trimmed on the elected sign)
    avg = (t1 + t2 + t3) / 3
    out = ties(theta0, specs, top_p=0.6, form="sum").state_dict["w"]
    assert torch.allclose(out, avg + torch.tensor([5.0, -6.0, 0.9, -4.0, 0.0]))


def test_ties_majority_sign_resolves_exact_cancellations():
    theta0 = {"w": torch.zeros(4)}
    # coordinate 0 cancels exactly (+2, -2); elsewhere positive sums dominate -> majority +
    specs = [{"w": torch.tensor([2.0, 1.0, 1.0, 1.0])}, {"w": torch.tensor([-2.0, 1.0, 1.0, 1.0])}]
    result = ties(theta0, specs, top_p=1.0)
    assert torch.allclose(result.state_dict["w"], torch.tensor([2.0, 1.0, 1.0, 1.0]))
    assert result.diagnostics["majority_sign"] == 1 and result.diagnostics["patched_coordinates"] == 1


def sequential_sum(rows: torch.Tensor) -> torch.Tensor:
    """Σ_i rows_i in row order from +0, the order TIES sums in (torch's dim-0 sum uses it for
    N ≤ 4 and on most columns beyond)."""
    acc = torch.zeros(rows.shape[1:], dtype=rows.dtype)
    for row in rows:
        acc = acc + row
    return acc


def dense_ties(theta0: dict, specs: list[dict], p: float, lam: float, form: str = "official") -> tuple[dict, torch.Tensor, int]:
    """The official TIES code on the concatenated task vectors (kthvalue, resolve_sign, disjoint
    mean), in float32 like the streamed inputs. Returns the merged keys, the thresholds and the
    majority sign."""
    keys = [k for k in theta0 if theta0[k].is_floating_point()]
    flat = torch.stack([torch.cat([(s[k].float() - theta0[k].float()).reshape(-1) for k in keys]) for s in specs])
    d = flat.shape[1]
    kth, _ = flat.abs().kthvalue(max(d - int(d * p), 1), dim=1, keepdim=True)
    if p >= 1:
        kth.zero_()
    trimmed = flat * (flat.abs() >= kth)
    sign = torch.sign(sequential_sum(trimmed))
    majority = int(torch.sign(sign.sum()))
    sign[sign == 0] = majority
    keep = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    sel = trimmed * keep
    if form == "official":
        base = torch.cat([theta0[k].float().reshape(-1) for k in keys])
        merged = base + lam * sequential_sum(sel) / (sel != 0).sum(0).float().clamp(min=1)
    else:
        base = torch.cat([weight_mean(torch.stack([s[k].float().reshape(-1) for s in specs])) for k in keys])
        merged = base + lam * sequential_sum(sel)
    out, at = {}, 0
    for k in keys:
        n = theta0[k].numel()
        out[k] = merged[at : at + n].reshape(theta0[k].shape).to(specs[0][k].dtype)
        at += n
    return out, kth.squeeze(1), majority


def ties_case(kind: str, n: int, dtype=torch.float32, seed: int = 0) -> tuple[dict, list[dict]]:
    """θ0 and n specialists (width 16, ~3k coordinates) with task vectors of a given kind:
    gauss (distinct magnitudes), int (small integers: exact sign cancellations and many magnitudes
    tied at the threshold, so whole boundary bins are patched), sparse (mostly τ = 0: the threshold
    is 0 for small p)."""
    theta0 = random_model(seed, width=16)
    g = torch.Generator().manual_seed(seed + 100)
    if kind != "gauss":  # integer τ exactly: θ0 = 0
        theta0 = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in theta0.items()}
    specs = []
    for i in range(n):
        s = {}
        for k, v in theta0.items():
            if not v.is_floating_point():
                s[k] = v.clone()
            elif kind == "gauss":
                s[k] = v + 0.01 * (1 + i) * torch.randn(v.shape, generator=g)
            elif kind == "int":
                s[k] = torch.randint(-3, 4, v.shape, generator=g).float()
            else:
                s[k] = torch.randint(-2, 3, v.shape, generator=g).float() * (torch.rand(v.shape, generator=g) < 0.1)
        s["head.weight"], s["head.bias"] = torch.randn(2, 16, generator=g), torch.randn(2, generator=g)
        specs.append(s)
    cast = lambda m: {k: v.to(dtype) if v.is_floating_point() else v for k, v in m.items()}
    return cast(theta0), [cast(s) for s in specs]


class CountingSink(DictSink):
    def __init__(self, layout):
        super().__init__(layout)
        self.patched = 0

    def patch(self, key, flat_index, values):
        self.patched += flat_index.numel()
        super().patch(key, flat_index, values)


@pytest.mark.parametrize(
    "kind,n,p,form,dtype",
    [
        ("gauss", 4, 0.1, "official", torch.float32),
        ("gauss", 6, 0.3, "sum", torch.float32),
        ("gauss", 3, 0.7, "official", torch.float16),
        ("gauss", 2, 0.2, "official", torch.bfloat16),
        ("int", 1, 0.2, "official", torch.float32),
        ("int", 3, 0.5, "official", torch.float32),
        ("int", 5, 0.2, "sum", torch.float32),
        ("int", 6, 0.3, "official", torch.float32),
        ("int", 6, 1.0, "official", torch.float32),
        ("int", 2, 0.2, "sum", torch.bfloat16),
        ("sparse", 4, 0.05, "official", torch.float32),
        ("sparse", 3, 0.5, "sum", torch.float32),
    ],
)
def test_ties_matches_official_dense_implementation(kind, n, p, form, dtype):
    """Streamed TIES (two passes, boundary bins patched after the merge) equals the dense official
    code bit for bit: thresholds, every merged value, the majority sign."""
    theta0, specs = ties_case(kind, n, dtype, seed=n)
    lam = 0.7 if form == "sum" else 1.0
    sink = CountingSink(TaskVectors(theta0, specs).layout())
    result = ties(theta0, specs, top_p=p, lam=lam, form=form, runtime=Runtime(sink=sink))
    out = result.state_dict
    expected, kth, majority = dense_ties(theta0, specs, p, lam, form)
    assert result.diagnostics["trim_thresholds"] == [float(t) for t in kth]
    assert result.diagnostics["majority_sign"] == majority
    for k, v in expected.items():
        assert out[k].dtype == dtype and torch.equal(out[k], v), k
    assert torch.equal(out[POS], theta0[POS])
    if kind == "int" and p < 1:  # thresholds tied by many entries: the boundary fix-up ran
        assert sink.patched > result.diagnostics["patched_coordinates"]


def test_ties_boundary_patches_reach_a_streamed_file(tmp_path):
    from safetensors.torch import save_file

    theta0, specs = ties_case("int", 4, seed=3)
    names = ["t0.safetensors"] + [f"s{i}.safetensors" for i in range(4)]
    for name, model in zip(names, [theta0, *specs]):
        save_file(model, str(tmp_path / name))
    src = [SafetensorsSource(tmp_path / name) for name in names]
    sink = SafetensorsSink(tmp_path / "out.safetensors", TaskVectors(src[0], src[1:]).layout())
    ties(src[0], src[1:], top_p=0.3, runtime=Runtime(sink=sink))
    sink.close()
    memory = ties(theta0, specs, top_p=0.3).state_dict
    back = SafetensorsSource(tmp_path / "out.safetensors")
    assert all(torch.equal(back.get(k), memory[k]) for k in memory)


def svd_truncate(w: torch.Tensor, r: float) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    k = max(1, int(r * min(w.shape) + 1e-9))
    return (u[:, :k] * s[:k]) @ vh[:k]


def dense_truncate(key: str, w: torch.Tensor, r: float) -> torch.Tensor:
    blocks = matrix_blocks(key, tuple(w.shape))
    if not blocks:
        return w.double()
    matrix = w.reshape(w.shape[0], -1)  # a 1×1 conv [out, in, 1, 1] is the matrix [out, in]
    return torch.cat([svd_truncate(part, r) for part in matrix.chunk(blocks, dim=0)]).reshape(w.shape)


def test_cart_matches_dense_svd_reference():
    theta0 = random_model(4)
    specs = specialists_of(theta0, 3, seed=2)
    out = cart(theta0, specs, eta=0.7, rank=0.5).state_dict
    for key in theta0:
        if not theta0[key].is_floating_point():
            assert torch.equal(out[key], theta0[key])
            continue
        taus = [s[key].double() - theta0[key].double() for s in specs]
        mean = sum(taus) / 3
        expected = theta0[key].double() + mean
        if matrix_blocks(key, tuple(theta0[key].shape)):
            expected = expected + 0.7 * sum(dense_truncate(key, t - mean, 0.5) for t in taus)
        assert torch.allclose(out[key].double(), expected, atol=1e-5), key
    mean_form = cart(theta0, specs, eta=0.7, rank=0.5, form="mean").state_dict
    avg = weight_average(theta0, specs).state_dict
    assert torch.allclose((mean_form[FC] - avg[FC]) * 3, out[FC] - avg[FC], atol=1e-5)


def test_cart_full_rank_is_weight_averaging():
    theta0 = random_model(6)
    specs = specialists_of(theta0, 3)
    out = cart(theta0, specs, rank=1.0).state_dict
    avg = weight_average(theta0, specs).state_dict
    for k in avg:
        assert torch.allclose(out[k], avg[k], atol=1e-6)


# -- invariants ------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", list(METHODS))
def test_single_specialist_and_key_order(method):
    theta0 = random_model(1)
    (spec,) = specialists_of(theta0, 1)
    result = merge(method, theta0, [spec])
    assert list(result.state_dict) == list(spec)
    assert torch.equal(result.state_dict["head.weight"], spec["head.weight"])
    if method in ("wa", "r2m"):
        for k in spec:
            assert torch.equal(result.state_dict[k], spec[k]), k


def test_wa_is_the_mean_and_identical_specialists_give_the_specialist():
    theta0 = random_model(2)
    specs = specialists_of(theta0, 5)
    out = weight_average(theta0, specs).state_dict
    for k in theta0:
        if theta0[k].is_floating_point():
            assert torch.allclose(out[k], torch.stack([s[k] for s in specs]).mean(0), atol=1e-6)
    same = [specs[0]] * 3
    out = weight_average(theta0, same).state_dict
    assert all(torch.equal(out[k], specs[0][k]) for k in specs[0])


def test_rank_rule():
    assert truncation_rank((1024, 1024), 0.7) == 716
    assert truncation_rank((4096, 1024), 0.1) == 102
    assert truncation_rank((10, 3), 0.1) == 1  # at least 1
    assert truncation_rank((100, 100), 0.29) == 29  # no float under-count (0.29*100 = 28.999…)
    assert matrix_blocks(QKV, (18, 6)) == 3 and matrix_blocks(OUT, (6, 6)) == 1
    assert matrix_blocks(LN, (6,)) == 0 and matrix_blocks("backbone.conv1.weight", (6, 6)) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", list(METHODS))
def test_half_precision_round_trip(method, dtype):
    theta0 = random_model(7, dtype=dtype)
    specs = specialists_of(theta0, 3, scale=0.05)
    for s in specs:
        s["head.weight"], s["head.bias"] = s["head.weight"].to(dtype), s["head.bias"].to(dtype)
    out = merge(method, theta0, specs).state_dict
    assert all(out[k].dtype == specs[0][k].dtype for k in out)
    reference = merge(method, {k: v.float() if v.is_floating_point() else v for k, v in theta0.items()},
                      [{k: v.float() if v.is_floating_point() else v for k, v in s.items()} for s in specs]).state_dict
    for k in out:
        if out[k].is_floating_point():
            assert torch.allclose(out[k].float(), reference[k].to(dtype).float(), atol=2e-2, rtol=2e-2), k
    same = merge(method, theta0, [specs[0]]).state_dict if method in ("wa", "r2m") else None
    if same is not None:
        assert all(torch.equal(same[k], specs[0][k]) for k in same)


# -- bad input --------------------------------------------------------------------------------------

def test_bad_inputs_name_the_source_and_key():
    theta0 = random_model(0)
    specs = specialists_of(theta0, 2)
    with pytest.raises(MergeError, match="no specialists"):
        weight_average(theta0, [])
    bad = dict(specs[1]); bad[FC] = torch.zeros(3, 3)
    with pytest.raises(MergeError, match=r"specialist\[1\].*mlp.c_fc.weight.*shape"):
        weight_average(theta0, [specs[0], bad])
    bad = dict(specs[1]); del bad[LN]
    with pytest.raises(MergeError, match=r"specialist\[1\].*missing key.*ln_1.weight"):
        weight_average(theta0, [specs[0], bad])
    bad = dict(specs[1]); bad["backbone.extra"] = torch.zeros(1)
    with pytest.raises(MergeError, match=r"backbone.extra"):
        weight_average(theta0, [specs[0], bad])
    bad = dict(specs[1]); bad[OUT] = bad[OUT].clone(); bad[OUT][0, 0] = float("nan")
    with pytest.raises(MergeError, match=r"specialist\[1\].*out_proj.weight.*NaN"):
        ties(theta0, [specs[0], bad])
    poisoned = dict(theta0); poisoned[FC] = poisoned[FC].clone(); poisoned[FC][2, 1] = float("inf")
    with pytest.raises(MergeError, match=r"pretrained.*c_fc.weight.*NaN or Inf"):
        merge("r2m", poisoned, specs)
    bad = dict(specs[0]); bad[LN] = torch.ones(6, dtype=torch.int64)
    with pytest.raises(MergeError, match=r"specialist\[0\].*ln_1.weight.*floating"):
        cart(theta0, [bad, specs[1]])
    with pytest.raises(MergeError, match="no hyperparameter 'alpha'"):
        merge("ta", theta0, specs, alpha=0.5)
    with pytest.raises(MergeError, match="unknown merge method"):
        merge("soup", theta0, specs)


# -- streaming: files in, file out -------------------------------------------------------------------

def test_streamed_files_equal_in_memory(tmp_path):
    from safetensors.torch import save_file

    theta0 = random_model(9)
    specs = specialists_of(theta0, 3)
    save_file(theta0, str(tmp_path / "t0.safetensors"))
    for i, s in enumerate(specs):
        save_file(s, str(tmp_path / f"s{i}.safetensors"))
    sources = lambda: [SafetensorsSource(tmp_path / n) for n in ("t0.safetensors", "s0.safetensors", "s1.safetensors", "s2.safetensors")]
    for method in METHODS:
        src = sources()
        layout = TaskVectors(src[0], src[1:]).layout()
        sink = SafetensorsSink(tmp_path / f"{method}.safetensors", layout)
        merge(method, src[0], src[1:], runtime=Runtime(sink=sink, prefetch=True))
        sink.close()
        memory = merge(method, theta0, specs, runtime=Runtime(prefetch=False)).state_dict
        back = SafetensorsSource(tmp_path / f"{method}.safetensors")
        assert back.keys() == src[1].keys()  # the first specialist's key order
        for k in memory:
            assert torch.allclose(back.get(k), memory[k], atol=1e-6), (method, k)
        from safetensors.torch import load_file  # the official reader accepts our streamed file
        assert set(load_file(str(tmp_path / f"{method}.safetensors"))) == set(memory)


def test_select_picks_the_best_grid_point_by_callers_score():
    theta0 = random_model(11)
    specs = specialists_of(theta0, 3)
    target = merge("ta", theta0, specs, lam=1.0).state_dict[FC]
    calls = []

    def score(state, hp):
        calls.append(hp)
        return -float((state[FC] - target).abs().sum())

    chosen = select("ta", theta0, specs, score)
    assert chosen.best_hparams["lam"] == 1.0 and len(chosen.table) == 2 and len(calls) == 2
    sel = select("r2m", theta0, specs, lambda s, hp: -abs(hp["alpha"] - 0.6) - abs(hp["rank"] - 0.3))
    assert sel.best_hparams["alpha"] == 0.6 and sel.best_hparams["rank"] == 0.3 and len(sel.table) == 12
    direct = merge("r2m", theta0, specs, alpha=0.6, rank=0.3)
    assert sel.best_diagnostics["eta"] == pytest.approx(direct.diagnostics["eta"])


def test_selection_holds_one_merged_model_at_a_time():
    """Each grid point is scored and dropped before the next is composed (the best is merged again
    by the caller), so the selection's memory is one merged model whatever the grid size."""
    import weakref

    theta0 = random_model(12)
    specs = specialists_of(theta0, 3)
    previous: list = []

    def score(state, hp):
        if previous:
            assert previous[-1]() is None, "the previous grid point is still in memory"
        previous.append(weakref.ref(state[FC]))
        return hp["alpha"]

    chosen = select("r2m", theta0, specs, score)
    assert len(previous) == 12 and chosen.best_hparams["alpha"] == 0.6


def test_ties_patch_reaches_a_streamed_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(4)}, str(tmp_path / "t0.safetensors"))
    save_file({"w": torch.tensor([2.0, 1.0, 1.0, 1.0])}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.tensor([-2.0, 1.0, 1.0, 1.0])}, str(tmp_path / "b.safetensors"))
    src = [SafetensorsSource(tmp_path / n) for n in ("t0.safetensors", "a.safetensors", "b.safetensors")]
    sink = SafetensorsSink(tmp_path / "out.safetensors", TaskVectors(src[0], src[1:]).layout())
    ties(src[0], src[1:], top_p=1.0, runtime=Runtime(sink=sink))
    sink.close()
    assert torch.equal(SafetensorsSource(tmp_path / "out.safetensors").get("w"), torch.tensor([2.0, 1.0, 1.0, 1.0]))
