"""Scoring real tiny detectors over on-disk datasets, and `r2m evaluate` / `r2m gate` end to end."""

import json

import numpy as np
import pytest
import torch
import yaml
from fixtures import make_generator_dataset
from typer.testing import CliRunner

from r2m.checkpoint import file_sha256, load_checkpoint, save_checkpoint
from r2m.cli import app
from r2m.data import ImageDataset, build_transform, validate_dataset
from r2m.evaluation import protocol
from r2m.evaluation.metrics import task_metrics
from r2m.evaluation.scoring import default_model_name, evaluate_models
from r2m.models import build_detector, ensure_pretrained
from r2m.models.detector import image_size


@pytest.fixture
def bench(params, project):
    """Two seen datasets, one unseen; θ0 plus three heads on it (two specialists, one 'merged')."""
    root = project / "data" / "generators"
    folders = [
        make_generator_dataset(root, "sq-ff", n_per_class=12, groups=6, seed=1),
        make_generator_dataset(root, "ck-ff", family="FR", artifact="checker", n_per_class=12, groups=6, seed=2),
        make_generator_dataset(root, "sq-new", family="other", domain="x", role="unseen",
                               n_per_class=12, groups=6, seed=3),
    ]
    datasets = [validate_dataset(f, root, params.data) for f in folders]
    theta0 = load_checkpoint(ensure_pretrained(params)).tensors
    paths = {}
    for seed, (name, meta) in enumerate({
        "specialist-sq-ff": {"kind": "specialist", "generator": "sq-ff"},
        "specialist-ck-ff": {"kind": "specialist", "generator": "ck-ff"},
        "r2m": {"kind": "merged", "method": "r2m"},
    }.items()):
        g = torch.Generator().manual_seed(seed)
        width = theta0["backbone.ln_post.weight"].shape[0]
        head = {"head.weight": torch.randn(2, width, generator=g), "head.bias": torch.zeros(2)}
        path = project / f"{name}.safetensors"
        save_checkpoint(path, {**theta0, **head}, {**meta, "model": {"name": params.model.name}})
        paths[name] = path
    return datasets, paths


def test_scores_match_a_direct_forward_pass_and_the_metrics(params, bench):
    datasets, paths = bench
    evaluation = evaluate_models(paths, datasets, params, progress=False)
    assert [t.name for t in evaluation.seen] == ["sq-ff", "ck-ff"]
    assert [t.name for t in evaluation.unseen] == ["sq-new"]
    assert evaluation.specialists() == {"specialist-sq-ff": "sq-ff", "specialist-ck-ff": "ck-ff"}
    assert evaluation.models["r2m"].sha256 == file_sha256(paths["r2m"])

    # the same numbers from a plain forward pass over the test split
    detector = build_detector(params.model)
    detector.load_checkpoint_tensors(load_checkpoint(paths["r2m"]).tensors)
    detector.eval()
    samples = datasets[0].split("test")
    data = ImageDataset(samples, build_transform(False, image_size(params.model.name), params.train))
    with torch.no_grad():
        images = torch.stack([data[i][0] for i in range(len(data))])
        expected = torch.softmax(detector(images), dim=1)[:, 1].numpy()
    labels, scores = evaluation.scores["r2m"]["sq-ff"]
    assert labels == [s.label for s in samples]
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    assert evaluation.metrics["r2m"]["sq-ff"] == task_metrics("sq-ff", labels, scores, [s.group for s in samples])

    # streaming (no cache) gives the same scores as the cached tensors
    streamed = evaluate_models({"r2m": paths["r2m"]}, datasets[:1], params, progress=False, cache_bytes=0)
    np.testing.assert_allclose(streamed.scores["r2m"]["sq-ff"][1], scores, rtol=1e-6)

    summary = protocol.summarize(evaluation, "r2m")
    aucs = evaluation.auc()
    assert summary.drop["ck-ff"] == pytest.approx(aucs["specialist-ck-ff"]["ck-ff"] - aucs["r2m"]["ck-ff"])
    assert summary.gain["sq-new"] == pytest.approx(
        aucs["r2m"]["sq-new"] - max(aucs["specialist-sq-ff"]["sq-new"], aucs["specialist-ck-ff"]["sq-new"]))
    assert default_model_name(paths["specialist-sq-ff"]) == "specialist-sq-ff"
    assert default_model_name(paths["r2m"]) == "r2m"


def test_score_cache_scores_each_checkpoint_once_and_follows_its_content(params, bench, project, monkeypatch):
    import r2m.evaluation.scoring as scoring

    datasets, paths = bench
    cache = project / "scores"
    first = evaluate_models(paths, datasets, params, progress=False, score_cache=cache)
    assert len(list(cache.glob("*.json"))) == len(paths) * len(datasets)

    def no_load(*args, **kwargs):
        raise AssertionError("a cached checkpoint was loaded again")

    monkeypatch.setattr(scoring, "load_detector", no_load)
    again = evaluate_models(paths, datasets, params, progress=False, score_cache=cache)
    assert again.scores == first.scores and again.metrics == first.metrics

    # a checkpoint whose content changes is scored again (the key is its sha256, not its name)
    monkeypatch.undo()
    ckpt = load_checkpoint(paths["r2m"])
    ckpt.tensors["head.weight"] = ckpt.tensors["head.weight"].flip(0)  # swap the classes
    save_checkpoint(paths["r2m"], ckpt.tensors, ckpt.meta)
    changed = evaluate_models({"r2m": paths["r2m"]}, datasets[:1], params, progress=False, score_cache=cache)
    assert changed.scores["r2m"]["sq-ff"][1] != first.scores["r2m"]["sq-ff"][1]
    assert len(list(cache.glob("*.json"))) == len(paths) * len(datasets) + 1


def _cli(args, project, gate: dict):
    (project / "params.yaml").write_text(yaml.safe_dump({"model": {"name": "r2m-tiny"}, "gate": gate}))
    return CliRunner().invoke(app, args, catch_exceptions=False)


def test_cli_gate_verdict_and_exit_status(project, bench):
    datasets, paths = bench
    args = ["gate", "--model", str(paths["r2m"]), "--specialist", str(paths["specialist-sq-ff"]),
            "--specialist", str(paths["specialist-ck-ff"]), *(str(d.root) for d in datasets),
            "--json", str(project / "gate.json")]
    lenient = {"max_drop": 1.0, "min_gain_macro": -1.0, "max_regression": 1.0, "min_auc": 0.0}
    result = _cli(args, project, lenient)
    assert result.exit_code == 0, result.output
    assert "gate passed" in result.output
    assert "Seen AUC" in result.output and "DROP" in result.output and "GAIN" in result.output
    doc = json.loads((project / "gate.json").read_text())
    assert doc["gate"]["passed"] is True
    assert doc["summary"]["drop_max"] == pytest.approx(max(doc["summary"]["drop"].values()))

    result = _cli(args, project, {**lenient, "min_auc": 1.01})  # no model reaches AUC > 1
    assert result.exit_code == 1
    assert "gate failed: min_auc" in result.output


def test_cli_evaluate_prints_tables_and_rejects_one_class_sets(project, bench):
    datasets, paths = bench
    result = _cli(["evaluate", "--model", str(paths["r2m"]), str(datasets[0].root)], project, {})
    assert result.exit_code == 0, result.output
    assert "r2m: per-task metrics" in result.output and "sq-ff" in result.output

    root = project / "data" / "generators"
    folder = make_generator_dataset(root, "fake-only", role="unseen", n_per_class=6, groups=3, seed=4)
    for f in (folder / "real").iterdir():
        f.unlink()
    (folder / "real").rmdir()
    result = _cli(["evaluate", "--model", str(paths["r2m"]), str(folder)], project, {})
    assert result.exit_code == 2  # a one-class set is a clear one-line error naming the folder
    assert "fake-only" in result.output and "one class only" in result.output
