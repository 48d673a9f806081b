"""A DVC remote on S3 for real: the project's dvc.yaml in a temp git repo, the data
root and a pipeline stage's outputs pushed to an S3 remote (moto's server, `team_s3`,
reached through `endpointurl`), then a second clone of the git repo pulls the same bytes —
how a second machine gets the same data (docs/usage.md, "Running r2m for a team").

One stage (`train@sq-ff`, one epoch of the tiny backbone) stands for the pipeline's outputs:
`dvc push` sends every output recorded in dvc.lock the same way.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from fixtures import make_generator_dataset
from test_dvc import TINY

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GIT_ID = {"GIT_AUTHOR_NAME": "r2m test", "GIT_AUTHOR_EMAIL": "test@r2m.invalid",
          "GIT_COMMITTER_NAME": "r2m test", "GIT_COMMITTER_EMAIL": "test@r2m.invalid"}


def sh(cwd: Path, env: dict, *cmd: str) -> str:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "R2M_"))}
    full.update(env)
    full.update(GIT_ID, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", DVC_NO_ANALYTICS="1",
                OMP_NUM_THREADS="1", TQDM_DISABLE="1", R2M_PROJECT_ROOT=str(cwd),
                PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(list(cmd), cwd=cwd, env=full, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_data_and_stage_outputs_push_to_s3_and_a_second_clone_pulls_them(team_s3, tmp_path):
    stack = team_s3
    first = tmp_path / "first"
    data_root = first / "data" / "generators"
    make_generator_dataset(data_root, "sq-ff", seed=1, n_per_class=16, groups=4)
    make_generator_dataset(data_root, "sq-un", role="unseen", family="other", seed=3, n_per_class=16, groups=4)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, first / name)
    doc = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in TINY.items():
        doc[section] = {**doc.get(section, {}), **values}
    doc["generators"] = ["sq-ff"]
    (first / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))

    env = dict(stack.s3_env)  # the remote's keys come from the environment, never from the repo
    remote = f"s3://{stack.bucket}/dvc"
    sh(first, env, "git", "init", "-q")
    sh(first, env, "dvc", "init", "-q")
    sh(first, env, "dvc", "remote", "add", "-d", "team", remote)
    sh(first, env, "dvc", "remote", "modify", "team", "endpointurl", stack.s3_endpoint)
    sh(first, env, "dvc", "add", "data")
    sh(first, env, "dvc", "repro", "train@sq-ff")
    pushed = sh(first, env, "dvc", "push")
    assert "pushed" in pushed, pushed
    sh(first, env, "git", "add", "-A")
    sh(first, env, "git", "commit", "-qm", "data and the first specialist")

    from servers import s3_client

    objects = s3_client(stack.s3_endpoint).list_objects_v2(Bucket=stack.bucket, Prefix="dvc/")
    assert objects.get("KeyCount", 0) >= len(digests(first / "data")) + 2  # every image, and the stage's outs

    # a second machine: the git repo (code, params, data.dvc, dvc.lock, remote config) + dvc pull
    second = tmp_path / "second"
    sh(tmp_path, env, "git", "clone", "-q", str(first), str(second))
    assert not (second / "data").exists()
    # the targets pushed (a pipeline run to its end is pulled whole by a bare `dvc pull`)
    sh(second, env, "dvc", "pull", "data.dvc", "train@sq-ff")
    assert digests(second / "data") == digests(first / "data")
    out = first / "artifacts" / "dvc" / "specialists"
    assert digests(second / "artifacts" / "dvc" / "specialists") == digests(out) and digests(out)
    status = sh(second, env, "dvc", "status", "train@sq-ff")
    assert "up to date" in status, status  # what was pulled is what the stage would produce: nothing to rerun
