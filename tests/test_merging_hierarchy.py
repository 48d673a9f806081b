"""Hierarchical R²M (docs/method.md, "Hierarchical merging") against a dense float64 reference,
its degenerate cases, and its streaming (no group model held in memory)."""

from __future__ import annotations

import pytest
import torch

from r2m.errors import MergeError
from r2m.merging import r2m, weight_average
from r2m.merging.hierarchy import Grouping, group_labels, hierarchical_points, hierarchical_r2m
from test_merging_methods import POS, random_model, specialists_of
from test_merging_r2m import dense_r2m

HP = {"alpha": 0.8, "rank": 0.3, "core": "uncentered"}


def dense_hierarchy(theta0: dict, specs: list[dict], labels: list[str], level1: dict, level2: dict) -> dict:
    """Both levels materialised in float64: groups of one are their specialist, of two their mean,
    of three or more dense R²M; level 2 dense R²M over the group models (their mean for K = 2)."""
    floats = [k for k in theta0 if theta0[k].is_floating_point()]
    groups: dict[str, list[dict]] = {}
    for spec, label in zip(specs, labels):
        groups.setdefault(label, []).append(spec)
    models = []
    for members in groups.values():
        if len(members) == 1:
            models.append({k: members[0][k].double() for k in floats})
        elif len(members) == 2:
            models.append({k: (members[0][k].double() + members[1][k].double()) / 2 for k in floats})
        else:
            merged, _ = dense_r2m(theta0, members, level1["alpha"], level1["rank"], core=level1["core"])
            models.append(merged)
    if len(models) == 1:
        out = models[0]
    elif len(models) == 2:
        out = {k: (models[0][k] + models[1][k]) / 2 for k in floats}
    else:
        out, _ = dense_r2m(theta0, models, level2["alpha"], level2["rank"], core=level2["core"])
    for key in ("head.weight", "head.bias"):  # the mean over all specialists, as flat merging
        out[key] = torch.stack([s[key].double() for s in specs]).mean(0)
    return out


@pytest.mark.parametrize("labels", [
    list("aabbcc"),        # three pairs: level 1 takes means, level 2 R²M over three group models
    list("aaabbc"),        # a group of three (level-1 R²M), a pair, a singleton
    list("aaaabbbcd"),     # groups of four and three, two singletons
    list("aabb"),          # two groups: level 2 is their mean
])
def test_two_level_merge_matches_the_dense_reference(labels):
    theta0 = random_model(7, width=8)
    specs = specialists_of(theta0, len(labels), seed=20 + len(labels))
    level1 = {"alpha": 0.6, "rank": 0.5, "core": "centered"}
    result = hierarchical_r2m(theta0, specs, Grouping.of(labels), level1=level1, **HP)
    expected = dense_hierarchy(theta0, specs, labels, level1, HP)
    for key, value in expected.items():
        assert torch.allclose(result.state_dict[key].double(), value, atol=3e-5), key
    assert torch.equal(result.state_dict[POS], theta0[POS])
    assert result.diagnostics["hierarchy"]["groups"] == {g: list(m) for g, m in Grouping.of(labels).groups.items()}


def test_all_in_one_group_is_that_groups_level1_merge():
    theta0 = random_model(8, width=8)
    specs = specialists_of(theta0, 5)
    one = hierarchical_r2m(theta0, specs, Grouping.of(["g"] * 5), level1=HP).state_dict
    flat = r2m(theta0, specs, **HP).state_dict
    assert all(torch.equal(one[k], flat[k]) for k in flat)


def test_all_singletons_is_flat_r2m():
    theta0 = random_model(9, width=8)
    specs = specialists_of(theta0, 4)
    singles = hierarchical_r2m(theta0, specs, Grouping.of(list("wxyz")), **HP).state_dict
    flat = r2m(theta0, specs, **HP).state_dict
    assert all(torch.equal(singles[k], flat[k]) for k in flat)


def test_one_group_of_two_is_weight_averaging():
    theta0 = random_model(10, width=8)
    specs = specialists_of(theta0, 2)
    pair = hierarchical_r2m(theta0, specs, Grouping.of(["g", "g"]), **HP).state_dict
    wa = weight_average(theta0, specs).state_dict
    assert all(torch.allclose(pair[k].double(), wa[k].double(), atol=1e-6) for k in wa)


def test_a_level2_grid_reuses_the_same_group_models(tmp_path):
    """Every level-2 point is composed over group models built once; each equals its single merge."""
    theta0 = random_model(11, width=8)
    specs = specialists_of(theta0, 6)
    grouping = Grouping.of(list("aabbcc"))
    points = [{"alpha": a, "rank": r, "k": 1, "core": "uncentered", "eta_mode": "normalized"}
              for r in (0.1, 0.5) for a in (0.6, 1.2)]
    grid = {tuple(sorted(hp.items())): res.state_dict
            for hp, res in hierarchical_points(theta0, specs, grouping, points=points, folder=tmp_path)}
    assert len(grid) == 4
    for hp in points:
        single = hierarchical_r2m(theta0, specs, grouping, folder=tmp_path, **hp).state_dict
        got = grid[tuple(sorted(hp.items()))]
        assert all(torch.equal(single[k], got[k]) for k in single)
    assert not list(tmp_path.iterdir())  # the group models and scratch are gone


def test_group_labels_by_family_or_mapping():
    gens, fams = ["fs-a", "fs-b", "fr-a"], ["FS", "FS", "FR"]
    assert group_labels("family", gens, fams) == ["FS", "FS", "FR"]
    assert group_labels({"fs-a": "x", "fr-a": "x"}, gens, fams) == ["x", "fs-b", "x"]
    with pytest.raises(MergeError, match="records no forgery family"):
        group_labels("family", gens, ["FS", None, "FR"])


@pytest.mark.parametrize("labels", [list("aabbcc"), list("aabb")])  # level 2: R²M over three; the mean of two
def test_hierarchical_selection_composes_each_point_after_dropping_the_last(labels, tmp_path, monkeypatch):
    """The loop's selection over a hierarchy holds one merged model at a time: when the next
    level-2 point is composed, the previous one is already gone (measured at ViT-L/14 shapes,
    N = 3: 3.8 GB peak before, 2.3 GB after; bench/merge_bench.py)."""
    import importlib
    import weakref

    from r2m.merging import select

    hierarchy = importlib.import_module("r2m.merging.hierarchy")
    r2m_module = importlib.import_module("r2m.merging.r2m")  # the module (r2m.merging.r2m is also the function)

    theta0 = random_model(13, width=8)
    specs = specialists_of(theta0, len(labels))
    previous: list = []
    composed = []

    def checked(fn):
        def wrapper(*args, **kwargs):
            if previous:
                assert previous[-1]() is None, "the previous grid point is still in memory"
            composed.append(fn.__name__)
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(r2m_module, "compose", checked(r2m_module.compose))
    monkeypatch.setattr(hierarchy, "average", checked(hierarchy.average))

    def score(state, hp):
        previous.append(weakref.ref(state[next(k for k in state if k.endswith("c_fc.weight"))]))
        return hp["alpha"]

    chosen = select("r2m", theta0, specs, score, hierarchy={"grouping": Grouping.of(labels), "folder": tmp_path})
    assert len(previous) == 12 and chosen.best_hparams["alpha"] == 0.6
    assert composed.count("compose" if len(set(labels)) > 2 else "average") >= 12
