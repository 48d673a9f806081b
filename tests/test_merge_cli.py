"""`r2m merge` end to end on the tiny open_clip backbone, and every bad input it must refuse."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from typer.testing import CliRunner
from fixtures import one_line_error

from r2m.checkpoint import file_sha256, recorded_path, save_checkpoint
from r2m.cli import app
from r2m.config import ModelConfig
from r2m.merging import merge
from r2m.merging.files import load_merged
from r2m.models.detector import build_detector, load_detector

runner = CliRunner()
QKV = "backbone.transformer.resblocks.0.attn.in_proj_weight"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """θ0 of r2m-tiny and three specialists (θ0 + small deltas, own heads), with sidecars."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    detector = build_detector(ModelConfig(name="r2m-tiny"))
    tensors = detector.checkpoint_tensors()
    theta0 = {k: v for k, v in tensors.items() if k.startswith("backbone.")}
    model = {"name": "r2m-tiny", "pretrained": None}
    t0_path = root / "theta0.safetensors"
    sha0 = save_checkpoint(t0_path, theta0, {"kind": "pretrained", "model": model})
    paths, states = [], []
    for i in range(3):
        state = {k: (v + 0.01 * torch.randn_like(v)) if v.is_floating_point() else v.clone() for k, v in tensors.items()}
        path = root / f"spec{i}.safetensors"
        save_checkpoint(path, state, {"kind": "specialist", "model": model, "theta0_sha256": sha0, "generator": f"gen{i}"})
        paths.append(path)
        states.append(state)
    return {"root": root, "theta0": t0_path, "specs": paths, "theta0_state": theta0, "states": states, "sha0": sha0, "model": model}


def run(*args):
    result = runner.invoke(app, ["merge", *map(str, args), "--quiet"])
    return result


@pytest.mark.parametrize("method,flags", [("wa", []), ("ta", ["--lam", "0.5"]), ("ties", ["--top-p", "0.3"]), ("cart", ["--eta", "0.5", "--rank", "0.3"]), ("r2m", ["--alpha", "0.4", "--rank", "0.5"])])
def test_merge_writes_safetensors_and_sidecar(checkpoints, tmp_path, project, method, flags):
    c = checkpoints
    out = tmp_path / f"{method}.safetensors"
    args = ["--method", method, "--pretrained", c["theta0"], *sum((["--specialist", p] for p in c["specs"]), []), "--out", out, *flags]
    result = run(*args)
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / f"{method}.safetensors.json").read_text())
    assert meta["kind"] == "merged" and meta["method"] == method and meta["theta0_sha256"] == c["sha0"]
    assert meta["generators"] == ["gen0", "gen1", "gen2"] and meta["sha256"] == file_sha256(out)
    assert [s["sha256"] for s in meta["specialists"]] == [file_sha256(p) for p in c["specs"]]
    merged = load_merged(out)
    in_memory = merge(method, c["theta0_state"], c["states"], **{k: v for k, v in meta["hparams"].items()}).state_dict
    assert set(merged) == set(in_memory)
    assert all(torch.allclose(merged[k], in_memory[k], atol=1e-6) for k in merged)
    if method == "r2m":
        assert meta["hparams"] == {"alpha": 0.4, "rank": 0.5, "k": 1, "core": "centered", "eta_mode": "normalized"}
        assert {"tau_bar_norm", "core_ratio", "cos_v_tau_bar", "residual_norm", "eta", "singular_values"} <= set(meta["diagnostics"])
    detector = load_detector(out)  # the merged file is a loadable checkpoint
    assert detector(torch.zeros(1, 3, 64, 64)).shape == (1, 2)


def test_r2m_defaults_come_from_params(checkpoints, tmp_path, project):
    (project / "params.yaml").write_text("merge:\n  parameters: {alpha: 0.6, rank: 0.3, core: uncentered}\n")
    c = checkpoints
    out = tmp_path / "m.safetensors"
    result = run("--method", "r2m", "--pretrained", c["theta0"], "--specialist", c["specs"][0], "--specialist", c["specs"][1], "--out", out)
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "m.safetensors.json").read_text())
    assert meta["hparams"]["alpha"] == 0.6 and meta["hparams"]["rank"] == 0.3 and meta["hparams"]["core"] == "uncentered"
    # a flag wins over params.yaml; the configured parameters never leak into another method
    result = run("--method", "r2m", "--alpha", "0.9", "--pretrained", c["theta0"], "--specialist", c["specs"][0],
                 "--specialist", c["specs"][1], "--out", out)
    assert result.exit_code == 0 and json.loads((tmp_path / "m.safetensors.json").read_text())["hparams"]["alpha"] == 0.9
    result = run("--method", "cart", "--pretrained", c["theta0"], "--specialist", c["specs"][0], "--specialist",
                 c["specs"][1], "--out", out)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "m.safetensors.json").read_text())["hparams"] == {"eta": 1.0, "rank": 0.1, "form": "sum"}


@pytest.mark.parametrize("merge, message", [
    ("{method: avg}", "merge.method: unknown method 'avg'"),
    ("{parameters: {alhpa: 0.5}}", "merge.parameters.alhpa: method 'r2m' has no such parameter"),
    ("{parameters: {core: centred}}", "merge.parameters.core: 'centred' is not one of centered, uncentered"),
    ("{parameters: {rank: high}}", "merge.parameters.rank: 'high' is not a float"),
    ("{grid: {alpha: []}}", "merge.grid.alpha: give at least one value"),
    ("{grid: {eta: [1.0]}}", "merge.grid.eta: method 'r2m' has no such parameter"),
    ("{baselines: [wa, dare]}", "merge.baselines: unknown method 'dare'"),
    ("{alpha: 0.5}", "unknown key 'merge.alpha'"),
])
def test_merge_section_is_checked_against_the_methods_declarations(checkpoints, tmp_path, project, merge, message):
    (project / "params.yaml").write_text(f"merge: {merge}\n")
    c = checkpoints
    result = run("--method", "wa", "--pretrained", c["theta0"], "--specialist", c["specs"][0], "--out",
                 tmp_path / "m.safetensors")
    one_line_error(result, message)


def _write_specialist(path, state, meta):
    save_checkpoint(path, state, meta)
    return path


def test_bad_inputs_exit_nonzero_with_one_line(checkpoints, tmp_path, project):
    c = checkpoints
    base = ["--pretrained", c["theta0"], "--specialist", c["specs"][0]]
    good_meta = {"kind": "specialist", "model": c["model"], "theta0_sha256": c["sha0"]}
    state = c["states"][1]
    out = tmp_path / "out.safetensors"

    # empty specialist list
    one_line_error(run("--method", "wa", "--pretrained", c["theta0"], "--out", out), "no specialists")
    # missing file
    one_line_error(run("--method", "wa", *base, "--specialist", tmp_path / "nope.safetensors", "--out", out), "nope.safetensors", "no such")
    # different shapes
    bad = _write_specialist(tmp_path / "shape.safetensors", {**state, QKV: torch.zeros(3, 3)}, good_meta)
    one_line_error(run("--method", "r2m", *base, "--specialist", bad, "--out", out), "shape.safetensors", QKV, "shape")
    # different keys
    missing = {k: v for k, v in state.items() if k != QKV}
    bad = _write_specialist(tmp_path / "keys.safetensors", missing, good_meta)
    one_line_error(run("--method", "ta", *base, "--specialist", bad, "--out", out), "keys.safetensors", QKV, "missing")
    # specialist from another θ0
    bad = _write_specialist(tmp_path / "other.safetensors", state, {**good_meta, "theta0_sha256": "0" * 64})
    one_line_error(run("--method", "wa", *base, "--specialist", bad, "--out", out), "other.safetensors", "another θ0")
    # no θ0 hash at all
    bad = _write_specialist(tmp_path / "nohash.safetensors", state, {"kind": "specialist"})
    one_line_error(run("--method", "wa", *base, "--specialist", bad, "--out", out), "nohash.safetensors", "theta0_sha256")
    # NaN and Inf weights
    for name, value in (("nan", float("nan")), ("inf", float("inf"))):
        poisoned = {**state, QKV: state[QKV].clone()}
        poisoned[QKV][1, 2] = value
        bad = _write_specialist(tmp_path / f"{name}.safetensors", poisoned, good_meta)
        one_line_error(run("--method", "ties", *base, "--specialist", bad, "--out", out), f"{name}.safetensors", QKV, "NaN or Inf")
    # non-floating tensor where a float is expected
    key = "backbone.ln_pre.weight"
    bad = _write_specialist(tmp_path / "int.safetensors", {**state, key: state[key].to(torch.int64)}, good_meta)
    one_line_error(run("--method", "cart", *base, "--specialist", bad, "--out", out), "int.safetensors", key, "floating")
    # not a safetensors file
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    one_line_error(run("--method", "wa", *base, "--specialist", junk, "--out", out), "junk.safetensors")
    # a flag that does not apply, a bad option value, an unknown method
    one_line_error(run("--method", "wa", *base, "--alpha", "0.5", "--out", out), "--alpha", "wa")
    one_line_error(run("--method", "r2m", *base, "--core", "sideways", "--out", out), "core")
    one_line_error(run("--method", "soup", *base, "--out", out), "soup")
    # nothing half-written
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_bare_checkpoints_merge_only_with_assume_theta0(checkpoints, tmp_path, project):
    """Files r2m did not write (no sidecar at all, or one without theta0_sha256) merge only when
    the user vouches for their θ0; the output records the waived check. A recorded hash is still
    checked, flag or not."""
    from safetensors.torch import save_file

    c = checkpoints
    bare = []
    for i, state in enumerate(c["states"][:2]):
        path = tmp_path / f"bare{i}.safetensors"
        save_file(state, str(path))  # no sidecar
        bare.append(path)
    out = tmp_path / "m.safetensors"
    args = ["--method", "wa", "--pretrained", c["theta0"], "--specialist", bare[0], "--specialist", bare[1], "--out", out]
    one_line_error(run(*args), "bare0.safetensors", "--assume-theta0")
    assert not out.exists()

    result = run(*args, "--assume-theta0")
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "m.safetensors.json").read_text())
    assert meta["theta0_check"]["waived_by"] == "--assume-theta0"
    assert [recorded_path(p) for p in meta["theta0_check"]["specialists"]] == bare  # relative to the project root
    assert [s["theta0_assumed"] for s in meta["specialists"]] == [True, True]
    merged = load_merged(out)
    want = merge("wa", c["theta0_state"], c["states"][:2]).state_dict
    assert all(torch.allclose(merged[k], want[k], atol=1e-6) for k in want)

    # an r2m specialist beside a bare one: only the bare one is waived
    out2 = tmp_path / "m2.safetensors"
    result = run("--method", "wa", "--pretrained", c["theta0"], "--specialist", c["specs"][0], "--specialist", bare[1],
                 "--out", out2, "--assume-theta0")
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "m2.safetensors.json").read_text())
    assert [recorded_path(p) for p in meta["theta0_check"]["specialists"]] == [bare[1]]
    assert [s["theta0_assumed"] for s in meta["specialists"]] == [False, True]

    # a specialist recording another θ0 is refused even with the flag
    other = _write_specialist(tmp_path / "other.safetensors", c["states"][2],
                              {"kind": "specialist", "model": c["model"], "theta0_sha256": "0" * 64})
    one_line_error(run("--method", "wa", "--pretrained", c["theta0"], "--specialist", bare[0], "--specialist", other,
                        "--out", tmp_path / "m3.safetensors", "--assume-theta0"), "other.safetensors", "another θ0")
    assert not (tmp_path / "m3.safetensors").exists()


def test_hierarchy_family_merges_each_family_then_the_groups(tmp_path, project):
    """`r2m merge --hierarchy family` on six tiny specialists of three families: the dense float64
    reference of the two-level merge (test_merging_hierarchy), the groups in the sidecar."""
    from test_merging_hierarchy import dense_hierarchy

    torch.manual_seed(1)
    detector = build_detector(ModelConfig(name="r2m-tiny"))
    tensors = detector.checkpoint_tensors()
    theta0 = {k: v for k, v in tensors.items() if k.startswith("backbone.")}
    model = {"name": "r2m-tiny", "pretrained": None}
    sha0 = save_checkpoint(tmp_path / "theta0.safetensors", theta0, {"kind": "pretrained", "model": model})
    families = ["FS", "FS", "FR", "FR", "EFS", "EFS"]
    paths, states = [], []
    for i, family in enumerate(families):
        state = {k: (v + 0.01 * torch.randn_like(v)) if v.is_floating_point() else v.clone() for k, v in tensors.items()}
        path = tmp_path / f"{family.lower()}-{i}.safetensors"
        save_checkpoint(path, state, {"kind": "specialist", "model": model, "theta0_sha256": sha0,
                                      "generator": path.stem, "families": [family]})
        paths.append(path)
        states.append(state)
    out = tmp_path / "h.safetensors"
    result = run("--method", "r2m", "--hierarchy", "family", "--alpha", "0.8", "--rank", "0.3", "--core", "uncentered",
                 "--pretrained", tmp_path / "theta0.safetensors", *sum((["--specialist", p] for p in paths), []), "--out", out)
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "h.safetensors.json").read_text())
    assert meta["hparams"]["hierarchy"]["groups"] == {"FS": ["fs-0", "fs-1"], "FR": ["fr-2", "fr-3"], "EFS": ["efs-4", "efs-5"]}
    expected = dense_hierarchy(theta0, states, families, {}, {"alpha": 0.8, "rank": 0.3, "core": "uncentered"})
    got = load_merged(out)
    for key, value in expected.items():
        assert torch.allclose(got[key].double(), value, atol=3e-5), key
    assert "groups FS: fs-0, fs-1" in result.output

    one_line_error(run("--method", "cart", "--hierarchy", "family", "--pretrained", tmp_path / "theta0.safetensors",
                       "--specialist", paths[0], "--out", tmp_path / "c.safetensors"), "--hierarchy applies to r2m only")
    one_line_error(run("--method", "r2m", "--hierarchy", "byname", "--pretrained", tmp_path / "theta0.safetensors",
                       "--specialist", paths[0], "--out", tmp_path / "c.safetensors"), "expected none, family or GEN=GROUP")
