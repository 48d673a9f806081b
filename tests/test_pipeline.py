"""The continual loop end to end (no Prefect): real MLflow SQLite store, real ONNX export,
tiny backbone and tiny datasets."""

from __future__ import annotations

import shutil

import pytest
from fixtures import LOOP, add, loop_params, state

from r2m.pipeline import run_once
from r2m.tracking import mlflow_store, registry

def test_first_onboarding_then_nothing_new_then_one_new(project, data_root):
    params = loop_params(project, flow={**LOOP["flow"], "all_in_one": True})
    first = run_once(params, progress=False)
    (all_in_one,) = (project / "artifacts" / "all-in-one").glob("*.safetensors")
    trained_at = all_in_one.stat().st_mtime_ns
    assert [s.generator for s in first.onboarded] == ["sq-ff", "sq2-ff"]
    # one generator at a time: a step over sq-ff alone, then the final candidate over both
    (step,) = first.steps
    assert step.gate_passed and step.version == "1"
    assert first.candidate is not None and first.candidate.gate_passed, first.candidate
    assert first.candidate.version == "2"
    assert first.release is not None and first.release.published.is_file()
    after_first = state(params)
    assert after_first["champion"] == first.candidate.version
    assert after_first["published"] == [1, 2]
    assert after_first["models"]["specialist-sq-ff"] == [1]
    assert after_first["models"]["r2m-detector"] == [1, 2]

    again = run_once(params, progress=False)
    assert again.onboarded == [] and again.release is None and again.candidate.reused
    assert state(params) == after_first  # nothing trained, registered or published
    assert all_in_one.stat().st_mtime_ns == trained_at  # the All-in-one baseline is reused too

    add(data_root, "sq3-ff", family="EFS", seed=4)
    third = run_once(params, progress=False)
    assert [s.generator for s in third.onboarded] == ["sq3-ff"]  # exactly one new specialist
    end = state(params)
    assert end["models"]["specialist-sq3-ff"] == [1]
    assert end["models"]["specialist-sq-ff"] == [1]  # the others were not retrained
    assert end["models"]["r2m-detector"] == [1, 2, 3] and third.steps == []  # one new candidate
    assert end["champion"] == third.candidate.version and end["published"] == [1, 2, 3]


def test_failed_gate_registers_failed_challenger_and_keeps_champion(project, data_root):
    params = loop_params(project)
    first = run_once(params, progress=False)
    before = state(params)
    add(data_root, "sq3-ff", family="EFS", seed=4)
    strict = loop_params(project, gate={"max_drop": 1.0, "min_gain_macro": -1.0, "max_regression": 1.0, "min_auc": 1.01})
    report = run_once(strict, progress=False)
    assert report.candidate is not None and not report.candidate.gate_passed
    assert "min_auc" in report.candidate.gate_reason
    client = mlflow_store.client(strict)
    failed = registry.get_version(client, report.candidate.version)
    assert failed.tags["gate"] == "failed" and "min_auc" in failed.tags["gate_reason"]
    after = state(strict)
    assert after["champion"] == before["champion"] == first.candidate.version
    assert after["published"] == before["published"] == [1, 2]


def test_bad_dataset_quarantined_and_loop_goes_on(project, data_root):
    bad = add(data_root, "broken-ff", seed=5)
    (bad / "fake" / "broken-ff-src0__000.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    params = loop_params(project)
    report = run_once(params, progress=False)
    assert [r.path.name for r in report.scan.rejected] == ["broken-ff"]
    assert "broken-ff-src0__000.png" in report.scan.rejected[0].reason
    assert not bad.exists()
    quarantined = list((project / "data" / "quarantine").glob("broken-ff-*"))
    assert len(quarantined) == 1 and (quarantined[0] / "REASON.txt").is_file()
    assert {s.generator for s in report.onboarded} == {"sq-ff", "sq2-ff"}
    assert report.champion is not None


def test_poisoned_specialist_rejected_and_champion_unchanged(project, data_root):
    params = loop_params(project)
    first = run_once(params, progress=False)
    before = state(params)
    # label-flipped: the artifact is in real/, clean images in fake/
    poisoned = add(data_root, "flip-ff", artifact="square", seed=6)
    shutil.move(poisoned / "real", poisoned / "tmp")
    shutil.move(poisoned / "fake", poisoned / "real")
    shutil.move(poisoned / "tmp", poisoned / "fake")
    report = run_once(params, progress=False)
    (flip,) = report.onboarded
    assert flip.generator == "flip-ff" and flip.status == "rejected"
    assert "outlier" in flip.reason
    assert report.release is None
    after = state(params)
    assert after["champion"] == before["champion"] == first.candidate.version
    assert after["published"] == before["published"]
    assert after["models"]["r2m-detector"] == before["models"]["r2m-detector"]  # same specialists: no new candidate


@pytest.mark.parametrize("stage", ["train", "merge", "export", "promote", "publish"])
def test_crash_at_any_stage_then_rerun_converges(project, data_root, monkeypatch, stage):
    if stage == "train":  # start without the cached specialists so that training really runs
        shutil.rmtree(project / "artifacts" / "specialists")
    import r2m.pipeline.candidate as candidate
    import r2m.pipeline.promotion as rel
    import r2m.pipeline.specialists as specialists

    targets = {
        "train": (specialists, "train_specialist"),
        "merge": (candidate, "merge_files"),
        "export": (rel, "export_checkpoint"),
        "promote": (rel.registry, "promote"),
        "publish": (rel, "publish"),
    }
    module, name = targets[stage]
    original = getattr(module, name)
    calls = {"n": 0}

    def crash_after_first(*args, **kwargs):
        calls["n"] += 1
        result = original(*args, **kwargs)
        if calls["n"] == 1:
            raise KeyboardInterrupt(f"killed during {stage}")  # like a kill: not an ordinary error
        return result

    monkeypatch.setattr(module, name, crash_after_first)
    params = loop_params(project)
    with pytest.raises(KeyboardInterrupt):
        run_once(params, progress=False)
    monkeypatch.setattr(module, name, original)
    report = run_once(params, progress=False)
    end = state(params)
    assert end["models"]["specialist-sq-ff"] == [1] and end["models"]["specialist-sq2-ff"] == [1]
    # the same end state as a run without the kill: the step over sq-ff, then the final candidate
    assert end["models"]["r2m-detector"] == [1, 2]  # no duplicate candidate
    assert end["champion"] == report.candidate.version == "2"
    assert end["published"] == [1, 2]  # each published once, whole
    assert not list(params.path("model_repository").rglob(".publish-*"))


def test_validation_scorer_uses_seen_val_only(project, data_root):
    from r2m.checkpoint import load_checkpoint
    from r2m.data import validate_dataset
    from r2m.errors import EvaluationError
    from r2m.evaluation.validation import ValidationScorer

    params = loop_params(project)
    seen = [validate_dataset(data_root / n, data_root, params.data) for n in ("sq-ff", "sq2-ff")]
    unseen = validate_dataset(data_root / "sq-un", data_root, params.data)
    with pytest.raises(EvaluationError, match="sq-un"):
        ValidationScorer(params, [*seen, unseen])
    (specialist,) = (project / "artifacts" / "specialists").glob("sq-ff-*.safetensors")
    score = ValidationScorer(params, seen)(load_checkpoint(specialist).tensors)
    assert 0.5 < score <= 1.0  # a trained specialist separates the square artifact on val


def test_one_specialist_step_is_that_specialist_and_chooses_nothing(project, data_root, monkeypatch):
    import torch

    import r2m.pipeline.candidate as candidate
    from r2m.checkpoint import load_checkpoint
    from r2m.data import validate_dataset
    from r2m.models import ensure_pretrained
    from r2m.pipeline.specialists import checkpoint_path

    def no_scorer(*args, **kwargs):
        raise AssertionError("R²M of one specialist has nothing to choose on validation")

    monkeypatch.setattr(candidate, "ValidationScorer", no_scorer)
    params = loop_params(project, merge={"select": True})
    dataset = validate_dataset(data_root / "sq-ff", data_root, params.data)
    specialist = checkpoint_path(dataset, params)
    merged, selection = candidate.merge_methods(params, ensure_pretrained(params), [specialist], [dataset],
                                                project / "merged", baselines=False)
    assert list(merged) == ["r2m"] and selection == {}
    got, want = load_checkpoint(merged["r2m"]).tensors, load_checkpoint(specialist).tensors
    assert set(got) == set(want)
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)


def test_hierarchical_loop_re_merges_only_the_new_specialists_group(project, data_root):
    """merge.hierarchy: family in the loop: the candidate records its groups in the registry; a new
    specialist of the FS family re-merges the FS group only (the FR group is a singleton here, the
    FS pair's group model is written once the pair exists and found again afterwards)."""
    import json

    params = loop_params(project, merge={"select": False, "hierarchy": "family"})
    first = run_once(params, progress=False)
    client = mlflow_store.client(params)
    tags = registry.get_version(client, first.candidate.version).tags
    assert json.loads(tags["hierarchy"]) == {"FS": ["sq-ff"], "FR": ["sq2-ff"]}
    groups = project / "artifacts" / "candidates" / "groups"
    assert not list(groups.glob("*.safetensors"))  # singletons need no group model

    add(data_root, "sq3-ff", family="FS", seed=4)
    second = run_once(params, progress=False)
    tags = registry.get_version(client, second.candidate.version).tags
    assert json.loads(tags["hierarchy"]) == {"FS": ["sq-ff", "sq3-ff"], "FR": ["sq2-ff"]}
    (pair,) = groups.glob("*.safetensors")  # the FS pair's model, with its sidecar
    assert json.loads(pair.with_name(pair.name + ".json").read_text())["rule"] == "mean of two"
    written = pair.stat().st_mtime_ns

    add(data_root, "sq4-ff", family="FR", seed=5)
    third = run_once(params, progress=False)
    tags = registry.get_version(client, third.candidate.version).tags
    assert json.loads(tags["hierarchy"]) == {"FS": ["sq-ff", "sq3-ff"], "FR": ["sq2-ff", "sq4-ff"]}
    assert pair.stat().st_mtime_ns == written  # the unchanged FS group was not merged again
    assert len(list(groups.glob("*.safetensors"))) == 2


def test_a_bad_merge_section_stops_the_loop_before_any_training(project, data_root):
    """params.yaml's merge section is checked against the methods' declarations before the first
    specialist is trained: a typo costs nothing."""
    from r2m.errors import ConfigError

    params = loop_params(project, merge={"select": False, "parameters": {"alhpa": 0.5}})
    with pytest.raises(ConfigError, match="merge.parameters.alhpa"):
        run_once(params, progress=False)
    assert state(params)["models"] == {}  # nothing trained, nothing registered


def test_real_agreement_check_compares_reals_of_the_same_domain_only(project, data_root):
    """Real photographs of another domain differ by domain, not by label: the first specialist of a
    new domain is not compared with them (its check is skipped and says so); one of a domain with
    an accepted specialist is compared with that domain's reals."""
    from r2m.config import load_params
    from r2m.data import validate_dataset
    from r2m.pipeline.safety import check_specialist, real_disagreement

    params = loop_params(project)
    first = run_once(params, progress=False)
    (sq,) = [s for s in first.specialists if s.generator == "sq-ff"]
    root = data_root
    other = validate_dataset(add(root, "sq-xx", domain="xx", seed=7), root, load_params(root=project).data)
    trusted = validate_dataset(root / "sq-ff", root, params.data)
    assert real_disagreement(sq.path, other, [trusted], params) is None  # no trusted reals of domain xx
    check = check_specialist(other, sq.path, 0.99, [(trusted, sq.path)], pretrained=sq.path, params=params)
    assert check.accepted and "not checked: no accepted specialist of the 'xx' domain yet" in check.reason
    sibling = validate_dataset(root / "sq2-ff", root, params.data)
    assert real_disagreement(sq.path, sibling, [trusted], params) is not None  # same domain: compared
