"""Does merging work from θ0? Random init vs proxy-pretrained θ0 (docs/pretraining.md).

For one θ0 setting: write θ0 (`ensure_pretrained`, timing the proxy pretraining), fine-tune one
specialist per seen dataset (`train_specialist`, the recipe of params.yaml with `model.lr`
overridable), merge them with weight averaging and R²M (`merge_files`, default α, r) and score
every model on every dataset's test split (`evaluate_models`).

    .venv/bin/python bench/pretrain_check.py --data /tmp/g/data --out /tmp/g/runs/b \\
        --pretrain '{"enabled": true}' --lr 1e-4 [--datasets fs-faces fr-faces efs-faces]

Reuses θ0 and specialists already in `--out` (same settings). Prints the AUC table and writes
`<out>/result.json`. Torch runs at `--threads` (2) threads.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from r2m.checkpoint import read_meta
from r2m.config import load_params
from r2m.data import validate_dataset
from r2m.evaluation.scoring import evaluate_models
from r2m.merging.files import merge_files
from r2m.models import ensure_pretrained
from r2m.training import train_specialist


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--pretrain", default='{"enabled": false}', help="JSON: the pretrain section")
    ap.add_argument("--lr", type=float, default=None, help="model.lr (default: params.yaml's)")
    ap.add_argument("--epochs", type=int, default=None, help="train.epochs (default: params.yaml's)")
    ap.add_argument("--datasets", nargs="+", default=["fs-faces", "fr-faces", "efs-faces"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--toy", action="store_true", help="write the test fixtures' toy datasets (square, band, checker artifacts) into --data first")
    ap.add_argument("--probe", action="store_true", help="only a linear probe of θ0's frozen features per dataset")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.toy:
        args.datasets = _write_toy(args.data)

    repo = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    model = repo.model.model_dump() | ({"lr": args.lr} if args.lr is not None else {})
    train = repo.train.model_dump() | ({"epochs": args.epochs} if args.epochs is not None else {})
    params = load_params(
        root=args.out,
        paths={"artifacts": str(args.out / "artifacts"), "data_root": str(args.data)},
        model=model,
        train=train,
        pretrain=json.loads(args.pretrain),
    )
    datasets = [validate_dataset(args.data / name, args.data, params.data) for name in args.datasets]

    t0 = time.perf_counter()
    theta0 = ensure_pretrained(params)
    theta0_seconds = time.perf_counter() - t0
    pretraining = read_meta(theta0).get("pretraining")
    print(f"θ0 {theta0} in {theta0_seconds:.1f} s; pretraining: {pretraining}")

    if args.probe:
        probe = linear_probe(theta0, datasets, params)
        print("linear probe on frozen θ0 features (test AUC):", {k: round(v, 3) for k, v in probe.items()})
        (args.out / "probe.json").write_text(json.dumps(probe, indent=2))
        return

    specialists, own = {}, {}
    for ds in datasets:
        out = args.out / "specialists" / f"{ds.name}.safetensors"
        if not out.is_file():
            t = time.perf_counter()
            res = train_specialist([ds], params, out, pretrained=theta0, progress=False)
            print(f"specialist {ds.name}: val AUC {res.metrics['val_auc']:.3f} in {time.perf_counter() - t:.0f} s")
        specialists[f"spec-{ds.name}"] = out
    paths = list(specialists.values())
    merged = {}
    for method in ("wa", "r2m"):
        out = args.out / "merged" / f"{method}.safetensors"
        result, _ = merge_files(method, theta0, paths, out)
        merged[method] = out
    taunorms = _task_vector_norms(theta0, paths)

    evaluation = evaluate_models({**specialists, **merged}, datasets, params, progress=False)
    auc = evaluation.auc()
    for ds in datasets:
        own[ds.name] = auc[f"spec-{ds.name}"][ds.name]
    rows = {"own specialist": own, **{m: {d.name: auc[m][d.name] for d in datasets} for m in merged}}
    for name in specialists:
        rows[name] = {d.name: auc[name][d.name] for d in datasets}
    header = f"{'model':<22}" + "".join(f"{d.name:>11}" for d in datasets) + f"{'mean':>8}"
    print(header)
    for name, r in rows.items():
        vals = [r[d.name] for d in datasets]
        print(f"{name:<22}" + "".join(f"{v:>11.3f}" for v in vals) + f"{sum(vals) / len(vals):>8.3f}")
    print("‖τ_i‖ / ‖θ0‖:", {k: round(v, 4) for k, v in taunorms.items()})
    (args.out / "result.json").write_text(
        json.dumps(
            {
                "pretrain": params.pretrain.model_dump(mode="json"),
                "model_lr": params.backbone_lr,
                "epochs": params.train.epochs,
                "theta0_seconds": theta0_seconds,
                "pretraining": pretraining,
                "auc": rows,
                "task_vector_relative_norms": taunorms,
                "threads": args.threads,
            },
            indent=2,
        )
    )


def linear_probe(theta0: Path, datasets, params) -> dict[str, float]:
    """Test AUC of a logistic regression on θ0's frozen features (train split → test split):
    how much of each task a θ0 already separates linearly, before any fine-tuning."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from torch.utils.data import DataLoader

    from r2m.checkpoint import load_checkpoint
    from r2m.data import ImageDataset, build_transform
    from r2m.models import build_detector

    detector = build_detector(params.model)
    detector.load_checkpoint_tensors(load_checkpoint(theta0).tensors, source=theta0)
    detector.eval()
    transform = build_transform(False, 64, params.train)

    def feats(samples):
        xs, ys = [], []
        with torch.no_grad():
            for images, labels in DataLoader(ImageDataset(samples, transform), batch_size=64):
                xs.append(detector.features(images).numpy())
                ys.append(labels.numpy())
        return np.concatenate(xs), np.concatenate(ys)

    out = {}
    for ds in datasets:
        xtr, ytr = feats(ds.split("train"))
        xte, yte = feats(ds.split("test"))
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000)).fit(xtr, ytr)
        out[ds.name] = float(roc_auc_score(yte, clf.predict_proba(xte)[:, 1]))
    return out


def _write_toy(data: Path) -> list[str]:
    """tests/fixtures.py datasets: smooth random 'photos' with an easy artifact each (64 per class)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from fixtures import make_generator_dataset

    names = []
    for i, artifact in enumerate(("square", "band", "checker")):
        name = f"toy-{artifact}"
        if not (data / name).is_dir():
            make_generator_dataset(data, name, artifact=artifact, n_per_class=64, groups=16, seed=10 + i)
        names.append(name)
    return names


def _task_vector_norms(theta0: Path, specialists: list[Path]) -> dict[str, float]:
    """‖θ_i − θ0‖ / ‖θ0‖ over the backbone: how far fine-tuning moved each specialist."""
    from r2m.checkpoint import load_checkpoint

    base = load_checkpoint(theta0).tensors
    base_norm = sum(float(v.float().pow(2).sum()) for v in base.values()) ** 0.5
    out = {}
    for path in specialists:
        t = load_checkpoint(path).tensors
        d = sum(float((t[k].float() - v.float()).pow(2).sum()) for k, v in base.items()) ** 0.5
        out[path.stem] = d / base_norm
    return out


if __name__ == "__main__":
    main()
