"""deploy/compose.yaml, parsed (no container engine here: it is not run). Its services are the
team picture (deploy/compose.yaml), and its MLflow / S3 / DVC settings are the ones tests/servers.py starts
and tests/test_team.py, tests/test_dvc_remote.py prove: the same `mlflow server` options, the
same driver in the backend URI, the server alone holding the S3 keys, clients given only
MLFLOW_TRACKING_URI."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import yaml
from servers import MLFLOW_CLIENT_ENV, MLFLOW_SERVER_ENV, mlflow_server_args

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "deploy" / "compose.yaml"


def test_compose_has_the_team_services_with_the_settings_the_tests_prove():
    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc["services"]
    assert {"mlflow-db", "minio", "mlflow", "prefect-db", "prefect-server", "gpu-worker", "detector"} <= set(services)

    mlflow = services["mlflow"]
    args = list(mlflow["command"])
    flags = [a for a in args if a.startswith("--")]
    value = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--") and not args[i + 1].startswith("--")}
    assert "--serve-artifacts" in flags  # artifacts proxied by the server
    backend, dest = value["--backend-store-uri"], value["--artifacts-destination"]
    expected = mlflow_server_args(backend, dest, value["--host"], int(value["--port"]))
    assert args[:len(expected)] == expected, (args, expected)  # the options tests/servers.py starts it with
    assert urlparse(backend).scheme == "postgresql+psycopg2" and urlparse(backend).hostname == "mlflow-db"
    assert dest.startswith("s3://") and "--default-artifact-root" not in flags
    assert set(MLFLOW_SERVER_ENV) <= set(mlflow["environment"])
    assert urlparse(mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"]).hostname == "minio"
    bucket = urlparse(dest).hostname
    assert f"mc mb --ignore-existing r2m/{bucket}" in " ".join(services["minio-bucket"]["command"])

    port = value["--port"]
    for name in ("gpu-worker",):
        env = services[name]["environment"]
        assert set(MLFLOW_CLIENT_ENV) <= set(env)
        assert env["MLFLOW_TRACKING_URI"] == f"http://mlflow:{port}"
        assert env["PREFECT_API_URL"].startswith("http://prefect-server:4200")
        assert "MLFLOW_S3_ENDPOINT_URL" not in env  # a client never needs the object store for MLflow
    prefect = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert urlparse(prefect).hostname == "prefect-db"

    # the worker publishes into the volume the detector serves (read-only there)
    worker_volumes = {v.split(":")[0]: v.split(":")[1] for v in services["gpu-worker"]["volumes"]}
    detector_volumes = {v.split(":")[0]: v.split(":")[1] for v in services["detector"]["volumes"]}
    assert worker_volumes["model-repository"] == services["gpu-worker"]["environment"]["R2M_MODEL_REPOSITORY"]
    assert detector_volumes["model-repository"] == "/models" and "/models" in services["detector"]["command"]
    assert services["gpu-worker"]["build"]["args"]["RUNTIME"] == "gpu"
    assert set(doc["volumes"]) >= {"model-repository", "mlflow-db", "prefect-db", "minio"}
