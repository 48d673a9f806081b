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

from fixtures import loop_params, make_data, make_generator_dataset, seed_mlflow_store  # noqa: E402,F401
from servers import team_registry, team_s3, team_stack  # noqa: E402,F401  (PostgreSQL + S3 + MLflow server, once per session)

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


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """θ0 and the two first specialists of `make_data`, trained once for the session (training is
    deterministic, so the loop recognises them by data hash, θ0 and recipe and does not train
    them again)."""
    from r2m.data import validate_dataset
    from r2m.models import ensure_pretrained
    from r2m.pipeline.specialists import checkpoint_path
    from r2m.training import train_specialist

    project = tmp_path_factory.mktemp("trained")
    root = make_data(project / "data" / "generators")
    params = loop_params(project)
    pretrained = ensure_pretrained(params)
    for name in ("sq-ff", "sq2-ff"):
        dataset = validate_dataset(root / name, root, params.data)
        train_specialist([dataset], params, checkpoint_path(dataset, params), pretrained=pretrained,
                         name=name, progress=False)
    return project / "artifacts"


@pytest.fixture
def data_root(project, trained):
    """A project holding `make_data`'s datasets, the trained specialists and an empty MLflow store."""
    import shutil

    shutil.copytree(trained, project / "artifacts")
    seed_mlflow_store(project)
    return make_data(project / "data" / "generators")
