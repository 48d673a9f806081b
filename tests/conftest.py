"""Shared test set-up: 1 thread everywhere, quiet progress bars, params rooted in a temp dir."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from fixtures import make_generator_dataset  # noqa: E402,F401

from r2m.config import Params, load_params  # noqa: E402

FAST_TRAIN = {"epochs": 2, "batch_size": 16}


@pytest.fixture
def project(tmp_path, monkeypatch) -> "os.PathLike":
    """An empty project root (no params.yaml: defaults) with env overrides pointing into it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("R2M_PROJECT_ROOT", str(tmp_path))
    for var in ("R2M_DATA_ROOT", "R2M_ARTIFACTS", "R2M_MODEL_REPOSITORY", "MLFLOW_TRACKING_URI", "R2M_PARAMS"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


@pytest.fixture
def params(project) -> Params:
    """Defaults of params.yaml, rooted in a temp project, with a short training recipe."""
    return load_params(
        root=project,
        model={"name": "r2m-tiny", "lr": 3e-4},
        train=FAST_TRAIN,
    )
