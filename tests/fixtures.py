"""Small on-disk generator datasets for tests (PNG files in the data contract)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from PIL import Image


def _photo(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random 'photo': low-frequency colour noise, upsampled."""
    small = rng.uniform(40, 215, size=(size // 8, size // 8, 3))
    img = Image.fromarray(small.astype(np.uint8)).resize((size, size), Image.BILINEAR)
    return np.asarray(img).astype(np.float32)


def _artifact(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    size = img.shape[0]
    out = img.copy()
    if kind == "square":  # a bright block: trivially separable
        y, x = rng.integers(0, size - size // 3, size=2)
        out[y : y + size // 3, x : x + size // 3] = 250
    elif kind == "checker":  # a high-frequency checkerboard overlay
        yy, xx = np.mgrid[:size, :size]
        out += 25.0 * (((yy + xx) % 2) * 2 - 1)[..., None]
    elif kind == "band":  # a dark horizontal band: another easy artifact, survives the augmentations
        y = rng.integers(0, size - size // 5)
        out[y : y + size // 5] *= 0.4
    elif kind == "none":  # no artifact: labels are noise
        pass
    else:
        raise ValueError(kind)
    return np.clip(out, 0, 255)


def make_generator_dataset(
    root: Path,
    name: str,
    *,
    family: str = "FS",
    domain: str = "ff",
    role: str = "seen",
    n_per_class: int = 24,
    groups: int = 6,
    artifact: str = "square",
    size: int = 64,
    seed: int = 0,
    **manifest,
) -> Path:
    """Write `root/name/` with generator.yaml, real/ and fake/ (`<group>__<i>.png`)."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / name
    for label in ("real", "fake"):
        (folder / label).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img = _photo(rng, size)
            if label == "fake":
                img = _artifact(img, artifact, rng)
            group = f"{name}-src{i % groups}"
            Image.fromarray(img.astype(np.uint8)).save(folder / label / f"{group}__{i:03d}.png")
    doc = {"name": name, "family": family, "domain": domain, "role": role, **manifest}
    (folder / "generator.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return folder


_MLFLOW_TEMPLATE: dict[str, Path] = {}


def seed_mlflow_store(project: Path) -> Path:
    """Put an empty, fully migrated MLflow SQLite store at `project/mlflow.db`.

    Creating a store runs MLflow's schema migrations (~15 s here); doing it once per session and
    copying the file keeps every test on its own real store without paying that each time.
    """
    import shutil
    import tempfile

    if "db" not in _MLFLOW_TEMPLATE:
        from mlflow import MlflowClient

        folder = Path(tempfile.mkdtemp(prefix="r2m-mlflow-template-"))
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        MlflowClient(tracking_uri=uri, registry_uri=uri).search_experiments()
        _MLFLOW_TEMPLATE["db"] = folder / "mlflow.db"
    target = Path(project) / "mlflow.db"
    shutil.copyfile(_MLFLOW_TEMPLATE["db"], target)
    return target


# ------------------------------------------------------------- the loop on tiny data (shared)

LOOP = {
    "model": {"name": "r2m-tiny", "pretrained": None, "lr": 3e-4, "head_lr": None},
    "train": {"epochs": 2, "batch_size": 16},
    "flow": {"all_in_one": False, "min_specialist_val_auc": 0.6},
    "merge": {"select": False},
    "export": {"int8": False, "parity_samples": 16, "exporter": "torchscript"},
    # these tests are about the loop's mechanics; the gate's rules have their own tests
    "gate": {"max_drop": 1.0, "min_gain_macro": -1.0, "max_regression": 1.0, "min_auc": 0.0},
}


def loop_params(project, **overrides):
    from r2m.config import load_params

    return load_params(root=project, **{**LOOP, **overrides})


def add(root, name, **kw):
    kw.setdefault("n_per_class", 32)
    kw.setdefault("groups", 8)
    return make_generator_dataset(root, name, **kw)


def versions(client, model):
    try:
        return sorted(int(mv.version) for mv in client.search_model_versions(f"name='{model}'"))
    except Exception:
        return []


def state(params):
    """What a run leaves behind that must converge: registry versions, aliases, published versions."""
    from r2m.export.publish import list_versions
    from r2m.tracking import mlflow_store, registry

    client = mlflow_store.client(params)
    models = {rm.name: versions(client, rm.name) for rm in client.search_registered_models()}
    return {
        "models": models,
        "champion": registry.alias_version(client, registry.CHAMPION),
        "published": list_versions(params.path("model_repository")),
    }


def make_data(root):
    add(root, "sq-ff", family="FS", seed=1)
    add(root, "sq2-ff", family="FR", seed=2)
    add(root, "sq-un", role="unseen", family="other", seed=3)
    return root


def one_line_error(result, *needles: str) -> None:
    """A CLI result that failed with exit 2 and one line (no traceback) naming every needle."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
