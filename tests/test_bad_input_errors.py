"""Bad paths and bad requests get one-line errors or 4xx, never a traceback or a 500."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from r2m.checkpoint import save_checkpoint
from r2m.cli import app
from r2m.config import DataConfig, ModelConfig, ServeConfig, load_params
from r2m.export.metadata import INPUT
from r2m.export.onnx_export import export_checkpoint
from r2m.export.publish import MODEL_NAME, publish
from r2m.models import build_detector

runner = CliRunner()


def _checkpoint(path, kind: str, seed: int, head: bool = True):
    torch.manual_seed(seed)
    tensors = build_detector(ModelConfig(name="r2m-tiny")).checkpoint_tensors()
    if not head:
        tensors = {k: v for k, v in tensors.items() if not k.startswith("head.")}
    save_checkpoint(path, tensors, {"kind": kind, "generator": f"g{seed}", "model": {"name": "r2m-tiny"}})
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """θ0, two specialists fine-tuned 'from' it (sidecars name its sha256), an ONNX export."""
    from r2m.checkpoint import file_sha256, read_meta, write_json, sidecar_path

    root = tmp_path_factory.mktemp("bad-input")
    theta0 = _checkpoint(root / "theta0.safetensors", "pretrained", 0, head=False)
    specialists = []
    for i in (1, 2):
        path = _checkpoint(root / f"s{i}.safetensors", "specialist", i)
        write_json(sidecar_path(path), {**read_meta(path), "theta0_sha256": file_sha256(theta0)})
        specialists.append(path)
    params = load_params(root=root, export={"exporter": "torchscript"})
    onnx = export_checkpoint(specialists[0], root / "model.onnx", params, int8=False).onnx_path
    return {"root": root, "theta0": theta0, "specialists": specialists, "onnx": onnx, "params": params}


def _one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception  # no traceback
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def _merge(files, out):
    args = ["merge", "--method", "wa", "--pretrained", str(files["theta0"]), "--out", str(out), "--quiet"]
    for s in files["specialists"]:
        args += ["--specialist", str(s)]
    return runner.invoke(app, args)


def test_merge_out_is_an_existing_folder_or_under_a_file(files, tmp_path):
    folder = tmp_path / "merged"
    folder.mkdir()
    _one_line_error(_merge(files, folder), "--out", str(folder), "is a folder")
    assert list(folder.iterdir()) == []  # no temp file left behind
    a_file = tmp_path / "notes.txt"
    a_file.write_text("a file, not a folder")
    _one_line_error(_merge(files, a_file / "merged.safetensors"), "--out", f"{a_file} is a file, not a folder")
    assert a_file.read_text() == "a file, not a folder"
    assert _merge(files, tmp_path / "ok" / "merged.safetensors").exit_code == 0  # a new folder is fine


def test_export_out_is_a_folder(files, tmp_path):
    folder = tmp_path / "onnx"
    folder.mkdir()
    res = runner.invoke(app, ["export", "--model", str(files["specialists"][0]), "--out", str(folder), "--no-int8"])
    _one_line_error(res, "--out", str(folder), "is a folder")
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_publish_repository_is_a_file(files, tmp_path):
    repo = tmp_path / "repo"
    repo.write_text("not a folder")
    res = runner.invoke(app, ["publish", "--onnx", str(files["onnx"]), "--repository", str(repo), "--force"])
    lines = [line for line in res.output.splitlines() if "error" in line]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert f"{repo} is a file, not a folder" in lines[0] and "Traceback" not in res.output
    assert repo.read_text() == "not a folder"


@pytest.fixture(scope="module")
def served(files):
    repo = files["root"] / "repo"
    publish(files["onnx"], repo, files["params"].export)
    with TestClient(create_app(repo)) as client:
        yield client


def create_app(repo):
    from r2m.serving.app import create_app as make

    return make(repo, ServeConfig(), DataConfig(), poll=False)


def _request(**extra) -> dict:
    x = np.zeros((1, 3, 64, 64), dtype=np.float32)
    return {"inputs": [{"name": INPUT, "shape": [1, 3, 64, 64], "datatype": "FP32", "data": x.ravel().tolist()}],
            **extra}


@pytest.mark.parametrize("outputs", [5, "logits", [5], [{"name": 3}], {"name": "logits"}])
def test_oip_malformed_outputs_get_400(served, outputs):
    res = served.post(f"/v2/models/{MODEL_NAME}/infer", json=_request(outputs=outputs))
    assert res.status_code == 400, res.text
    assert "'outputs' must be a list" in res.json()["detail"]


def test_oip_deeply_nested_json_gets_400_and_server_keeps_answering(served):
    depth = 100_000
    for body in ("[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth):
        res = served.post(f"/v2/models/{MODEL_NAME}/infer", content=body.encode(),
                          headers={"content-type": "application/json"})
        assert res.status_code == 400, res.text[:200]
        assert "nested too deeply" in res.json()["detail"]
    ok = served.post(f"/v2/models/{MODEL_NAME}/infer", content=json.dumps(_request()).encode())
    assert ok.status_code == 200 and len(ok.json()["outputs"]) == 2
