"""`r2m evaluate` and `r2m export` refuse checkpoints they would score silently wrong."""

from __future__ import annotations

import pytest
import torch
from fixtures import make_generator_dataset
from typer.testing import CliRunner

from r2m.checkpoint import save_checkpoint
from r2m.cli import app
from r2m.config import ModelConfig
from r2m.models import build_detector, ensure_pretrained

runner = CliRunner()
BACKBONE_KEY = "backbone.conv1.weight"


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_detector(ModelConfig(name="r2m-tiny")).checkpoint_tensors()


def _broken(path, change) -> str:
    tensors = _tensors()
    change(tensors)
    save_checkpoint(path, tensors, {"kind": "merged", "method": "r2m", "model": {"name": "r2m-tiny"}})
    return str(path)


def _nan(tensors):
    tensors[BACKBONE_KEY][0, 0, 0, 0] = float("nan")


CASES = {
    "integer backbone tensor": (lambda t: t.update({BACKBONE_KEY: t[BACKBONE_KEY].round().to(torch.int32)}),
                                [BACKBONE_KEY, "torch.int32", "floating-point"]),
    "integer head": (lambda t: t.update({"head.weight": (t["head.weight"] * 100).to(torch.int64)}),
                     ["head.weight", "torch.int64", "floating-point"]),
    "NaN weight": (_nan, [BACKBONE_KEY, "NaN"]),
    "no head keys": (lambda t: [t.pop(k) for k in ("head.weight", "head.bias")], ["no trained head", "head.weight"]),
    "half a head": (lambda t: t.pop("head.bias"), ["half a head", "'head.weight' without 'head.bias'"]),
}


@pytest.fixture
def bad_files(project, params):
    files = {name: _broken(project / f"{name.replace(' ', '-')}.safetensors", change) for name, (change, _) in CASES.items()}
    files["θ0 itself"] = str(ensure_pretrained(params))
    return files


def _expected(name: str) -> list[str]:
    return CASES[name][1] if name in CASES else ["no trained head", "θ0"]


def _assert_refused(result, path: str, needles: list[str]) -> None:
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert path in line, line  # the file at fault is named ...
    for needle in needles:  # ... and the key and what is wrong with it
        assert needle in line, line


def test_evaluate_refuses_each_bad_checkpoint(project, bad_files):
    data = make_generator_dataset(project / "data" / "generators", "fs-a", n_per_class=8, groups=4)
    for name, path in bad_files.items():
        result = runner.invoke(app, ["evaluate", str(data), "--model", path])
        _assert_refused(result, path, _expected(name))


def test_export_refuses_each_bad_checkpoint_and_writes_nothing(project, bad_files):
    for name, path in bad_files.items():
        out = project / f"{name.replace(' ', '-')}.onnx"
        result = runner.invoke(app, ["export", "--model", path, "--out", str(out), "--no-int8"])
        _assert_refused(result, path, _expected(name))
        assert not out.exists()
