"""Specialists trained elsewhere in the continual loop: `r2m register-specialist` checks them like
the loop's own (θ0, own validation AUC, label-flip guard), and the next `r2m run` merges an
accepted one. Real MLflow SQLite store, tiny backbone and datasets."""

from __future__ import annotations

import shutil

from fixtures import make_generator_dataset, one_line_error, seed_mlflow_store
from safetensors.torch import save_file
from typer.testing import CliRunner

from r2m.checkpoint import file_sha256, load_checkpoint, read_meta, recorded_path, sidecar_path
from r2m.cli import app
from r2m.config import load_params
from r2m.data import validate_dataset
from r2m.models import ensure_pretrained
from r2m.pipeline import registered_specialists, run_once
from r2m.tracking import mlflow_store, registry
from r2m.training import train_specialist

runner = CliRunner()
LOOP = {
    "model": {"name": "r2m-tiny", "pretrained": None, "lr": 3e-4, "head_lr": None},
    "train": {"epochs": 2, "batch_size": 16},
    "flow": {"all_in_one": False, "min_specialist_val_auc": 0.6},
    "merge": {"select": False, "baselines": []},
    "export": {"int8": False, "parity_samples": 16, "exporter": "torchscript"},
    "gate": {"max_drop": 1.0, "min_gain_macro": -1.0, "max_regression": 1.0, "min_auc": 0.0},
}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def versions(client, generator):
    try:
        return client.search_model_versions(f"name='{registry.specialist_model_name(generator)}'")
    except Exception:
        return []


def train_elsewhere(root, name, params, out):
    """A specialist made outside the loop (here by the same recipe, into a folder of its own)."""
    dataset = validate_dataset(root / name, root, params.data)
    train_specialist([dataset], params, out, pretrained=ensure_pretrained(params, progress=False), name=name, progress=False)
    return out


def test_external_specialist_checked_registered_and_merged(project):
    seed_mlflow_store(project)
    (project / "params.yaml").write_text("")
    root = project / "data" / "generators"
    make_generator_dataset(root, "sq-ff", family="FS", n_per_class=32, groups=8, seed=1)
    make_generator_dataset(root, "sq2-ff", family="FR", n_per_class=32, groups=8, seed=2)
    make_generator_dataset(root, "sq-un", role="unseen", family="other", n_per_class=32, groups=8, seed=3)
    params = load_params(root=project, **LOOP)
    client = mlflow_store.client(params)
    theta0 = ensure_pretrained(params, progress=False)

    # a bare file (no r2m sidecar): refused unless the user vouches for its θ0
    bare = train_elsewhere(root, "sq2-ff", params, project / "elsewhere" / "sq2.safetensors")
    sidecar_path(bare).unlink()
    register = ["register-specialist", bare, "--generator", "sq2-ff", "-q"]
    one_line_error(invoke(*register), "sq2.safetensors", "--assume-theta0")
    one_line_error(invoke("register-specialist", bare, "--generator", "nope", "--assume-theta0", "-q"), "nope")
    assert versions(client, "sq2-ff") == []
    result = invoke(*register, "--assume-theta0")
    assert result.exit_code == 0 and "accepted" in result.output, result.output
    (mv,) = versions(client, "sq2-ff")
    assert mv.tags["origin"] == "external" and mv.tags["theta0_check"] == "assumed" and mv.tags["status"] == "accepted"
    assert float(mv.tags["val_auc"]) >= 0.6  # scored here on sq2-ff's validation split
    result = invoke(*register, "--assume-theta0")  # the same file again: the same version
    assert result.exit_code == 0 and "registered before" in result.output
    assert len(versions(client, "sq2-ff")) == 1

    report = run_once(params, progress=False)
    assert [s.generator for s in report.onboarded] == ["sq-ff"]  # the loop trained no sq2-ff of its own
    external = next(s for s in report.specialists if s.generator == "sq2-ff")
    assert read_meta(external.path)["origin"] == "external"  # the registered copy, read through its run's artifact URI
    assert file_sha256(external.path) == mv.tags["sha256"]
    merged = read_meta(report.candidate.path)
    assert external.path in [recorded_path(s["path"], project) for s in merged["specialists"]]
    assert merged["theta0_sha256"] == read_meta(external.path)["theta0_sha256"]
    assert report.candidate.gate_passed and report.champion == report.candidate.version
    champion = report.champion
    assert "specialist-sq2-ff v1" in registry.get_version(client, champion).tags["lineage.sq2-ff"]

    # a label-flipped dataset's specialist, imported from open_clip layout with its θ0 recorded
    flip = make_generator_dataset(root, "flip-ff", n_per_class=32, groups=8, seed=6)
    shutil.move(flip / "real", flip / "tmp")
    shutil.move(flip / "fake", flip / "real")
    shutil.move(flip / "tmp", flip / "fake")
    trained = load_checkpoint(train_elsewhere(root, "flip-ff", params, project / "elsewhere" / "flip.safetensors")).tensors
    save_file({k.removeprefix("backbone."): v for k, v in trained.items() if k.startswith("backbone.")},
              str(project / "elsewhere" / "flip-visual.safetensors"))
    save_file({"weight": trained["head.weight"], "bias": trained["head.bias"]}, str(project / "elsewhere" / "flip-head.safetensors"))
    imported = project / "elsewhere" / "flip-imported.safetensors"
    result = invoke("import-checkpoint", project / "elsewhere" / "flip-visual.safetensors", "--format", "open_clip",
                    "--head", project / "elsewhere" / "flip-head.safetensors", "--pretrained", theta0, "--out", imported)
    assert result.exit_code == 0, result.output
    result = invoke("register-specialist", imported, "--generator", "flip-ff", "-q")
    assert result.exit_code == 1 and "rejected" in result.output and "outlier" in result.output, result.output
    (mv,) = versions(client, "flip-ff")
    assert mv.tags["status"] == "rejected" and mv.tags["theta0_check"] == "sha256"
    assert registry.alias_version(client, registry.CHAMPION) == champion
    accepted = registered_specialists(params, ["flip-ff", "sq-ff", "sq2-ff"], client)
    assert [s.generator for s in accepted] == ["sq-ff", "sq2-ff"]  # the next merge leaves it out
