"""The DVC pipeline for real: the project's dvc.yaml in a temp git repo, `dvc repro` on tiny data.

One sequence (each step needs the previous one's state): first repro runs every stage and
leaves metrics, plots and an ONNX model; a second repro is a no-op; adding a generator to
params.yaml retrains only that generator's specialist (checked up to the merge, to keep the
test short: evaluate and export are the same commands as in the first repro).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from fixtures import make_generator_dataset

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY = {
    "model": {"name": "r2m-tiny", "pretrained": None, "lr": 3.0e-4, "head_lr": None},
    "train": {"epochs": 1, "batch_size": 16},
    "merge": {"select": False, "baselines": ["wa"]},
    "export": {"int8": False, "parity_samples": 16},
}


def write_params(project: Path, generators: list[str]) -> None:
    """The project's params.yaml (every key DVC tracks), with a tiny recipe and `generators`."""
    doc = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in TINY.items():
        doc[section] = {**doc.get(section, {}), **values}
    doc["generators"] = generators
    (project / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def dvc(project: Path, *args: str) -> str:
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `r2m` and `python` of this venv
        "R2M_PROJECT_ROOT": str(project),
        "DVC_NO_ANALYTICS": "1",
        "OMP_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
    }
    done = subprocess.run([str(BIN / "dvc"), *args], cwd=project, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def ran(output: str) -> set[str]:
    """The stages a `dvc repro` actually ran."""
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def test_repro_twice_then_a_new_generator_retrains_only_its_stage(project):
    data_root = project / "data" / "generators"
    make_generator_dataset(data_root, "sq-ff", seed=1)
    make_generator_dataset(data_root, "ck-ff", family="FR", artifact="checker", seed=2)
    make_generator_dataset(data_root, "sq-un", role="unseen", family="other", seed=3)
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")
    shutil.copy(REPO / ".dvcignore", project / ".dvcignore")
    shutil.copy(REPO / ".gitignore", project / ".gitignore")  # data/, artifacts/, reports/ ignored by git
    write_params(project, ["sq-ff", "ck-ff"])
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    dvc(project, "init", "-q")
    dvc(project, "add", "data")  # data.dvc tracks the data root; stages depend on folders inside it
    assert yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["path"] == "data"

    first = dvc(project, "repro")
    assert ran(first) == {"train@sq-ff", "train@ck-ff", "merge", "evaluate", "export"}
    dvc_dir = project / "artifacts" / "dvc"
    for name in ("sq-ff", "ck-ff"):
        meta = json.loads((dvc_dir / "specialists" / f"{name}.safetensors.json").read_text())
        assert meta["kind"] == "specialist" and meta["generator"] == name
    assert json.loads((dvc_dir / "merged" / "r2m.safetensors.json").read_text())["generators"] == ["sq-ff", "ck-ff"]
    assert (dvc_dir / "onnx" / "r2m-detector.onnx").is_file()

    metrics = json.loads(dvc(project, "metrics", "show", "--json"))
    shown = next(iter(metrics.values()))["data"]["reports/dvc/metrics.json"]["data"]
    assert {k for k in shown if k.startswith("auc/") and "/ci_" not in k} == {"auc/sq-ff", "auc/ck-ff", "auc/sq-un"}
    assert 0.0 <= shown["auc_seen_mean"] <= 1.0 and shown["drop_max"] is not None
    assert shown["drop_max/ci_low"] <= shown["drop_max"] <= shown["drop_max/ci_high"]
    assert isinstance(shown["gate_passed"], bool)
    plots = json.loads(dvc(project, "plots", "show", "--json"))["data"]
    assert {"reports/dvc/roc/sq-ff.csv", "reports/dvc/roc/sq-un.csv",
            "reports/dvc/plots/drop_heatmap.png", "reports/dvc/plots/gain_heatmap.png"} <= set(plots)
    specialist = dvc_dir / "specialists" / "sq-ff.safetensors"
    trained_at = specialist.stat().st_mtime_ns

    second = dvc(project, "repro")
    assert ran(second) == set(), second  # nothing changed: a no-op
    assert specialist.stat().st_mtime_ns == trained_at

    make_generator_dataset(data_root, "ck2-ff", family="EFS", artifact="checker", seed=4)
    write_params(project, ["sq-ff", "ck-ff", "ck2-ff"])
    status = dvc(project, "status")
    assert "train@ck2-ff" in status and "train@sq-ff" not in status and "train@ck-ff" not in status
    third = dvc(project, "repro", "merge")  # up to the merge: evaluate and export were run above
    assert ran(third) == {"train@ck2-ff", "merge"}  # one new specialist only
    assert specialist.stat().st_mtime_ns == trained_at
    merged = json.loads((dvc_dir / "merged" / "r2m.safetensors.json").read_text())
    assert merged["generators"] == ["sq-ff", "ck-ff", "ck2-ff"]
