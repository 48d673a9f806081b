"""Bad inputs to `r2m import-checkpoint`, `r2m register-specialist` and `r2m merge`, as a hostile
user would give them: each ends in one line on stderr naming the file, key or flag at fault and
exit status 2, never a traceback, and writes nothing. Real files throughout: safetensors,
`torch.save` files read back with `torch.load(weights_only=True)`, Hugging Face folders written by
transformers, the real MLflow SQLite store."""

from __future__ import annotations

import json
import os

import numpy as np
import open_clip
import pytest
import torch
from fixtures import make_generator_dataset, one_line_error, seed_mlflow_store
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel
from typer.testing import CliRunner

from r2m.checkpoint import file_sha256, read_meta, save_checkpoint
from r2m.cli import app
from r2m.config import ModelConfig, load_params
from r2m.models import build_detector, ensure_pretrained
from r2m.models.detector import load_detector, register_model_configs

runner = CliRunner()
HF_TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, image_size=32,
               patch_size=8, hidden_act="quick_gelu")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def tiny_visual() -> dict[str, torch.Tensor]:
    """The visual tower of open_clip's r2m-tiny (width 128, 4 heads), as open_clip saves it."""
    register_model_configs()
    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in open_clip.create_model("r2m-tiny").visual.state_dict().items()}


def deepfakebench_state(config: CLIPVisionConfig, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Linear, dict]:
    """A DeepfakeBench CLIP detector's state dict (`backbone.` = HF CLIPVisionTransformer, `head.`)."""
    torch.manual_seed(seed)
    tower = CLIPVisionModel(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tower.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    head = torch.nn.Linear(config.hidden_size, 2)
    state = {f"backbone.{k}": v for k, v in tower.state_dict().items()}
    state.update({f"head.{k}": v for k, v in head.state_dict().items()})
    return tower, head, state


@pytest.fixture
def sources(project):
    """Good sources to break one thing in: an open_clip visual file, a Hugging Face folder, a
    DeepfakeBench .pth, a θ0 imported from the folder."""
    visual = project / "visual.safetensors"
    save_file(tiny_visual(), str(visual))
    torch.manual_seed(0)
    hf = project / "hf"
    CLIPVisionModel(CLIPVisionConfig(**HF_TINY)).save_pretrained(hf)
    pth = project / "ckpt_best.pth"
    torch.save(deepfakebench_state(CLIPVisionConfig(**HF_TINY))[2], pth)
    return {"visual": visual, "hf": hf, "pth": pth}


def _visual_with(project, key, value):
    path = project / f"bad-{key}.safetensors"
    save_file({**tiny_visual(), key: value}, str(path))
    return path


def _hf_config_with(project, sources, **changes):
    folder = project / "hf-bad"
    folder.mkdir(exist_ok=True)
    for f in sources["hf"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **changes}))
    return folder


def _sharded(project, sources, index_text=None, weight_map=None):
    folder = project / "sharded"
    folder.mkdir()
    (folder / "config.json").write_bytes((sources["hf"] / "config.json").read_bytes())
    (folder / "part-1.safetensors").write_bytes((sources["hf"] / "model.safetensors").read_bytes())
    text = index_text if index_text is not None else json.dumps({"weight_map": weight_map})
    (folder / "model.safetensors.index.json").write_text(text)
    return folder


def _pth(project, obj, name="odd.pth"):
    path = project / name
    torch.save(obj, path)
    return path


def _loop(project):
    os.symlink(project / "loop-b", project / "loop-a")
    os.symlink(project / "loop-a", project / "loop-b")
    return project / "loop-a"


class Pickled:
    """A class in a .pth file: code, not weights."""


OUT = "out.safetensors"
# case -> (the command line after `r2m import-checkpoint`, built from the project and good sources;
#          what the one line must name)
IMPORT_CASES = {
    "scalar class_embedding": (
        lambda p, s: [_visual_with(p, "class_embedding", torch.tensor(1.0)), "--format", "open_clip", "--heads", "4",
                      "--act", "gelu", "--out", p / OUT],
        ["bad-class_embedding.safetensors", "class_embedding", "shape []"]),
    "zero-width class_embedding": (
        lambda p, s: [_visual_with(p, "class_embedding", torch.zeros(0)), "--format", "open_clip", "--heads", "4",
                      "--act", "gelu", "--out", p / OUT],
        ["class_embedding", "shape [0]"]),
    "--heads 0": (lambda p, s: [s["visual"], "--format", "open_clip", "--heads", "0", "--act", "gelu", "--out", p / OUT],
                  ["--heads is 0", "≥ 1"]),
    "--heads -4": (lambda p, s: [s["visual"], "--format", "open_clip", "--heads", "-4", "--act", "gelu", "--out", p / OUT],
                   ["--heads is -4", "≥ 1"]),
    "num_attention_heads 0": (lambda p, s: [_hf_config_with(p, s, num_attention_heads=0), "--format", "hf-clip", "--out", p / OUT],
                              ["config.json", "num_attention_heads is 0"]),
    "string layer_norm_eps": (lambda p, s: [_hf_config_with(p, s, layer_norm_eps="1e-5"), "--format", "hf-clip", "--out", p / OUT],
                              ["config.json", "layer_norm_eps", '"1e-5"', "expected a number"]),
    "list hidden_act": (lambda p, s: [_hf_config_with(p, s, hidden_act=["gelu"]), "--format", "hf-clip", "--out", p / OUT],
                        ["config.json", "hidden_act"]),
    "non-JSON shard index": (lambda p, s: [_sharded(p, s, index_text="{not json"), "--format", "hf-clip", "--out", p / OUT],
                             ["model.safetensors.index.json", "not a readable JSON index"]),
    "shard outside the folder": (
        lambda p, s: [_sharded(p, s, weight_map={"a": "../visual.safetensors"}), "--format", "hf-clip", "--out", p / OUT],
        ["model.safetensors.index.json", "../visual.safetensors", "inside"]),
    "shard linked outside the folder": (
        lambda p, s: [_link_shard(_sharded(p, s, weight_map={"a": "link.safetensors"}), s["visual"]),
                      "--format", "hf-clip", "--out", p / OUT],
        ["link.safetensors", "outside"]),
    ".pth keys not strings": (lambda p, s: [_pth(p, {1: torch.zeros(2), 2: torch.ones(2)}), "--format", "deepfakebench",
                                            "--out", p / OUT],
                              ["odd.pth", "key 1 is a int", "strings"]),
    "symlink loop as SRC": (lambda p, s: [_loop(p), "--format", "open_clip", "--out", p / OUT], ["loop-a", "symlink loop"]),
    "--out an existing folder": (lambda p, s: [s["visual"], "--format", "open_clip", "--heads", "4", "--act", "gelu",
                                               "--out", _folder(p / "taken")],
                                 ["taken", "--out is a folder"]),
    "--out under a file": (lambda p, s: [s["visual"], "--format", "open_clip", "--heads", "4", "--act", "gelu",
                                         "--out", p / "visual.safetensors" / OUT],
                           ["--out", "visual.safetensors is a file, not a folder"]),
    "missing --pretrained": (lambda p, s: [s["pth"], "--format", "deepfakebench", "--pretrained", p / "nope.safetensors",
                                           "--out", p / OUT],
                             ["nope.safetensors", "--pretrained: no such file"]),
    "pickled code": (lambda p, s: [_pth(p, {"state_dict": {}, "cls": Pickled}, "pickled.pth"), "--format", "deepfakebench",
                                   "--out", p / OUT],
                     ["pickled.pth", "refused for safety", "weights_only=True", "arbitrary code execution",
                      "Unsupported global", "Pickled"]),
}


def _link_shard(folder, target):
    os.symlink(target, folder / "link.safetensors")
    return folder


def _folder(path):
    path.mkdir()
    return path


@pytest.mark.parametrize("case", list(IMPORT_CASES))
def test_import_checkpoint_refuses_in_one_line_and_writes_nothing(project, sources, case):
    build, needles = IMPORT_CASES[case]
    args = build(project, sources)
    before = {p for p in project.rglob("*")}
    result = runner.invoke(app, ["import-checkpoint", *map(str, args)])
    one_line_error(result, *needles)
    assert "bug in r2m" not in result.output
    assert {p for p in project.rglob("*")} == before  # no output, no sidecar, no temp file


def test_missing_pretrained_names_the_file_not_its_sidecar(project, sources):
    result = invoke("import-checkpoint", sources["pth"], "--format", "deepfakebench", "--pretrained",
                    project / "nope.safetensors", "--out", project / OUT)
    one_line_error(result, "no such file")
    assert "sidecar" not in result.output


# ------------------------------------------------------------------------- assumptions said as such


def _logits(detector, x):
    with torch.no_grad():
        return detector(x)


def test_deepfakebench_assumptions_are_printed_and_recorded(project):
    """A DeepfakeBench file records neither heads nor activation: the importer takes 64-wide heads
    and QuickGELU, says so on stderr with the flag that overrides each, and records it. For a
    tower with other heads the guess is visibly wrong, and --heads fixes it."""
    config = CLIPVisionConfig(**{**HF_TINY, "num_attention_heads": 4})  # 32-wide heads: not DeepfakeBench's 64
    tower, head, state = deepfakebench_state(config, seed=3)
    torch.save(state, project / "odd.pth")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = head(tower(pixel_values=x).pooler_output)

    guessed = project / "guessed.safetensors"
    result = runner.invoke(app, ["import-checkpoint", str(project / "odd.pth"), "--format", "deepfakebench", "--out", str(guessed)])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if "assumption:" in line]
    assert len(notes) == 2, result.stderr
    assert any("heads = 2" in n and "--heads N" in n for n in notes), notes
    assert any("activation = quick_gelu" in n and "--act gelu" in n for n in notes), notes
    assert read_meta(guessed)["assumed"] == {"heads": 2, "act": "quick_gelu"}
    assert (_logits(load_detector(guessed, require_head=True), x) - want).abs().max() > 1e-3  # the guess was wrong

    given = project / "given.safetensors"
    result = runner.invoke(app, ["import-checkpoint", str(project / "odd.pth"), "--format", "deepfakebench", "--heads", "4",
                                 "--out", str(given)])
    assert result.exit_code == 0, result.output
    assert "--heads" not in result.stderr and "activation = quick_gelu" in result.stderr
    assert read_meta(given)["assumed"] == {"act": "quick_gelu"}
    assert torch.allclose(_logits(load_detector(given, require_head=True), x), want, atol=1e-5)


def test_nothing_assumed_when_a_file_says_it(project, sources):
    out = project / "theta0.safetensors"
    result = runner.invoke(app, ["import-checkpoint", str(sources["hf"]), "--format", "hf-clip", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "assumption" not in result.stderr and read_meta(out)["assumed"] == {}


# ------------------------------------------------------------------------- recorded paths


def test_sidecars_record_paths_relative_to_the_project_root(project, sources, tmp_path_factory):
    from r2m.checkpoint import record_path, recorded_path

    theta0 = project / "models" / "theta0.safetensors"
    assert invoke("import-checkpoint", sources["hf"], "--format", "hf-clip", "--out", theta0).exit_code == 0
    spec = project / "models" / "spec.safetensors"
    result = invoke("import-checkpoint", sources["pth"], "--format", "deepfakebench", "--pretrained", theta0, "--out", spec)
    assert result.exit_code == 0, result.output
    meta = read_meta(spec)
    assert meta["pretrained"] == "models/theta0.safetensors" and meta["imported"]["source"] == "ckpt_best.pth"
    assert recorded_path(meta["pretrained"]) == theta0 and recorded_path(meta["imported"]["source"]) == sources["pth"]

    elsewhere = tmp_path_factory.mktemp("elsewhere") / "ckpt.pth"  # outside the project: absolute
    elsewhere.write_bytes(sources["pth"].read_bytes())
    result = invoke("import-checkpoint", elsewhere, "--format", "deepfakebench", "--pretrained", theta0,
                    "--out", project / "spec2.safetensors")
    assert result.exit_code == 0, result.output
    assert read_meta(project / "spec2.safetensors")["imported"]["source"] == str(elsewhere)
    assert recorded_path(str(elsewhere)) == elsewhere  # an absolute entry (older sidecars) reads as it is

    merged = project / "merged.safetensors"
    result = invoke("merge", "--method", "wa", "--pretrained", theta0, "--specialist", spec,
                    "--specialist", project / "spec2.safetensors", "--out", merged, "--quiet")
    assert result.exit_code == 0, result.output
    meta = read_meta(merged)
    assert meta["pretrained"] == "models/theta0.safetensors"
    assert [s["path"] for s in meta["specialists"]] == ["models/spec.safetensors", "spec2.safetensors"]
    assert [recorded_path(s["path"]) for s in meta["specialists"]] == [spec, project / "spec2.safetensors"]

    moved = project.parent / f"{project.name}-moved"  # the records still mean the same files after a move
    project.rename(moved)
    assert recorded_path(meta["pretrained"], moved) == moved / "models" / "theta0.safetensors"
    assert (recorded_path(meta["pretrained"], moved)).is_file()
    assert record_path(moved / "a" / "b.safetensors", moved) == "a/b.safetensors"
    moved.rename(project)


def test_mlflow_default_experiment_points_into_the_project_and_follows_a_move(project, monkeypatch):
    from r2m.tracking import mlflow_store

    seed_mlflow_store(project)  # a store made elsewhere: its Default experiment names that folder
    params = load_params(root=project)
    client = mlflow_store.client(params)
    assert client.get_experiment("0").artifact_location == (project / "mlartifacts" / "0").as_uri()

    moved = project.parent / f"{project.name}-moved"
    project.rename(moved)
    try:
        monkeypatch.chdir(moved)
        monkeypatch.setenv("R2M_PROJECT_ROOT", str(moved))
        client = mlflow_store.client(load_params(root=moved))
        assert client.get_experiment("0").artifact_location == (moved / "mlartifacts" / "0").as_uri()
    finally:
        monkeypatch.chdir(moved.parent)
        moved.rename(project)


def test_a_fresh_store_has_its_default_experiment_in_the_project(project, tmp_path_factory, monkeypatch):
    from r2m.tracking import mlflow_store

    elsewhere = tmp_path_factory.mktemp("cwd")  # MLflow would put Default under <cwd>/mlruns
    monkeypatch.chdir(elsewhere)
    client = mlflow_store.client(load_params(root=project))
    assert client.get_experiment("0").artifact_location == (project / "mlartifacts" / "0").as_uri()
    assert not (elsewhere / "mlruns").exists()


# ------------------------------------------------------------------------- register-specialist and merge


@pytest.fixture
def loop(project):
    """A project with an MLflow store, one seen dataset and the loop's θ0 (r2m-tiny)."""
    seed_mlflow_store(project)
    (project / "params.yaml").write_text("model:\n  name: r2m-tiny\n  pretrained: null\n")
    root = project / "data" / "generators"
    make_generator_dataset(root, "sq-ff", n_per_class=32, groups=8, seed=1)
    params = load_params(root=project)
    theta0 = ensure_pretrained(params, progress=False)
    return {"params": params, "theta0": theta0}


def _specialist(path, theta0, change=None, theta0_sha256="theta0"):
    torch.manual_seed(1)
    tensors = build_detector(ModelConfig(name="r2m-tiny")).checkpoint_tensors()
    if change:
        change(tensors)
    meta = {"kind": "specialist", "model": {"name": "r2m-tiny"}}
    if theta0_sha256 is not None:
        meta["theta0_sha256"] = file_sha256(theta0) if theta0_sha256 == "theta0" else theta0_sha256
    save_checkpoint(path, tensors, meta)
    return path


def _overflow(tensors):
    """Finite weights whose logits overflow: every score is NaN."""
    tensors["head.weight"].fill_(3e38)
    tensors["head.bias"].zero_()


REGISTER_CASES = {  # case -> (the file, flags, what the one line must name)
    "missing file": (lambda p, t: p / "nope.safetensors", [], ["nope.safetensors", "no such checkpoint file"]),
    "half a head": (lambda p, t: _specialist(p / "half.safetensors", t, lambda x: x.pop("head.bias")), [],
                    ["half.safetensors", "half a head", "'head.bias'"]),
    "theta0_sha256 not a string": (lambda p, t: _specialist(p / "num.safetensors", t, theta0_sha256=12345),
                                   ["--assume-theta0"], ["num.safetensors.json", "'theta0_sha256' is 12345 (int)"]),
    "NaN outputs": (lambda p, t: _overflowing(p / "nan.safetensors", t), [],
                    ["nan.safetensors", "NaN or Inf fake scores", "sq-ff"]),
    "symlink loop": (lambda p, t: _loop(p), ["--assume-theta0"], ["loop-a", "symbolic link to nothing"]),
}


def _overflowing(path, theta0):
    """A specialist whose weights are all finite (so they pass the finite-weights check) but whose
    scores are all NaN."""
    _specialist(path, theta0, _overflow)
    with torch.no_grad():
        scores = torch.softmax(load_detector(path)(torch.randn(2, 3, 64, 64)), 1)[:, 1].numpy()
    assert not np.isfinite(scores).any()
    return path


@pytest.mark.parametrize("case", list(REGISTER_CASES))
def test_register_specialist_refuses_before_anything_is_written(project, loop, case):
    from r2m.tracking import mlflow_store

    build, flags, needles = REGISTER_CASES[case]
    path = build(project, loop["theta0"])
    result = invoke("register-specialist", path, "--generator", "sq-ff", *flags, "-q")
    one_line_error(result, *needles)
    assert "no record of its θ0" not in result.output  # existence and contract before provenance
    external = project / "artifacts" / "specialists" / "external"
    assert not external.exists() or list(external.iterdir()) == []  # nothing copied, no sidecar
    client = mlflow_store.client(loop["params"])
    assert client.search_registered_models() == []


def test_merge_refuses_a_half_head_and_a_broken_theta0_record(project, loop):
    good = _specialist(project / "good.safetensors", loop["theta0"])
    half = _specialist(project / "half.safetensors", loop["theta0"], lambda x: x.pop("head.weight"))
    num = _specialist(project / "num.safetensors", loop["theta0"], theta0_sha256=["a", "list"])
    out = project / "m.safetensors"
    base = ["merge", "--method", "wa", "--pretrained", loop["theta0"], "--out", out, "--quiet"]
    one_line_error(invoke(*base, "--specialist", good, "--specialist", half), "half.safetensors", "half a head",
                   "'head.weight'")
    one_line_error(invoke(*base, "--specialist", good, "--specialist", num, "--assume-theta0"),
                   "num.safetensors.json", "'theta0_sha256'", "(list)")
    one_line_error(invoke(*base, "--specialist", good, "--specialist", project / "gone.safetensors"),
                   "gone.safetensors", "no such checkpoint file")
    assert not out.exists()


def test_a_half_head_is_refused_when_loaded(project):
    torch.manual_seed(0)
    detector = build_detector(ModelConfig(name="r2m-tiny"))
    tensors = detector.checkpoint_tensors()
    tensors.pop("head.bias")
    from r2m.errors import CheckpointError

    with pytest.raises(CheckpointError, match="half a head: 'head.weight' without 'head.bias'"):
        detector.load_checkpoint_tensors(tensors, source="half.safetensors")
    path = project / "half.safetensors"
    save_checkpoint(path, tensors, {"kind": "specialist", "model": {"name": "r2m-tiny"}})
    with pytest.raises(CheckpointError, match="half a head"):
        load_detector(path)
