"""Sanity of the embedded benchmark: is it a benchmark whose merge results mean something?

Measures, on `r2m demo-data` output:
1. generation time of the whole benchmark;
2. global statistics: per dataset, the AUC of a logistic regression on per-image pixel mean/std
   (grouped 5-fold cross-validation, so a source's crops never sit on both sides), the best single
   statistic's AUC, and the file formats / sizes / modes of real vs fake (all PNG: no JPEG
   quantisation table to compare). Values near 0.5 mean no global statistic gives the label away;
3. each family's own measurable artifact (spectral peak ratio, fine-scale energy) as an AUC;
4. the specialists × datasets AUC table: one specialist per seen dataset, trained with the tiny
   backbone by `r2m.training.train_specialist` (the recipe of params.yaml), scored on every
   dataset's test split. Own family should be high, transfer clearly lower.

    .venv/bin/python bench/demo_sanity.py --out /tmp/demo-bench [--size N] [--no-train]

Writes `<out>/sanity.md` (the tables) and `<out>/sanity.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from r2m.config import load_params
from r2m.data import GeneratorDataset, validate_dataset
from r2m.data.demo import DATASETS, build_demo_data
from r2m.data.demo import measures


def load_datasets(root: Path) -> dict[str, GeneratorDataset]:
    return {spec.name: validate_dataset(root / spec.name, root) for spec in DATASETS}


def global_statistic_check(ds: GeneratorDataset) -> dict:
    """Can per-image mean/std (or the file itself) tell fake from real? AUCs near 0.5 say no."""
    images = [np.asarray(Image.open(s.path)) for s in ds.samples]
    labels = np.array([s.label for s in ds.samples])
    groups = np.array([s.group for s in ds.samples])
    feats = np.stack([measures.global_statistics(img) for img in images])
    folds = min(5, len(set(groups)))
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    scores = cross_val_predict(model, feats, labels, groups=groups, cv=GroupKFold(folds), method="predict_proba")[:, 1]
    single = [roc_auc_score(labels, feats[:, j]) for j in range(feats.shape[1])]
    formats = {
        label: Counter((im.format, im.mode, im.size) for im in (Image.open(s.path) for s in ds.samples if s.label == label))
        for label in (0, 1)
    }
    return {
        "logreg_mean_std_auc": float(roc_auc_score(labels, scores)),
        "max_single_stat_auc": float(max(single, key=lambda a: abs(a - 0.5))),
        "formats_equal": set(formats[0]) == set(formats[1]),
        "formats": sorted({f"{fmt} {mode} {w}x{h}" for c in formats.values() for fmt, mode, (w, h) in c}),
        "jpeg_files": sum(c for fmt in formats.values() for (f, _, _), c in fmt.items() if f == "JPEG"),
    }


def artifact_statistics(ds: GeneratorDataset) -> dict:
    """AUC (fake vs real) of the family-specific statistics of `r2m.data.demo.measures`."""
    imgs = [np.asarray(Image.open(s.path)) for s in ds.samples]
    labels = [s.label for s in ds.samples]
    stats = {
        "spectral_peak_x2": lambda x: measures.spectral_peak_ratio(x, 2),
        "spectral_peak_x4": lambda x: measures.spectral_peak_ratio(x, 4),
        "fine_scale_energy": measures.high_frequency_ratio,
    }
    return {name: float(roc_auc_score(labels, [fn(x) for x in imgs])) for name, fn in stats.items()}


def test_tensors(datasets: dict[str, GeneratorDataset], params) -> dict[str, tuple]:
    """Each dataset's test split through the eval transform, decoded once for every specialist."""
    import torch

    from r2m.data import ImageDataset, build_transform
    from r2m.models.detector import image_size

    transform = build_transform(False, image_size(params.model.name), params.train)
    out = {}
    for name, ds in datasets.items():
        data = ImageDataset(ds.split("test"), transform)
        out[name] = (torch.stack([data[i][0] for i in range(len(data))]), np.array(data.labels))
    return out


def score_all(checkpoint: Path, tensors: dict[str, tuple]) -> dict[str, float]:
    """Test-split AUC of one checkpoint on every dataset: load_detector + softmax[:, 1]."""
    import torch

    from r2m.models import load_detector
    from r2m.models.detector import pick_device

    device = pick_device()
    detector = load_detector(checkpoint, device=device)
    aucs = {}
    with torch.no_grad():
        for name, (images, labels) in tensors.items():
            scores = [
                torch.softmax(detector(images[b : b + 128].to(device)).float(), 1)[:, 1].cpu().numpy()
                for b in range(0, len(images), 128)
            ]
            aucs[name] = float(roc_auc_score(labels, np.concatenate(scores)))
    return aucs


def train_specialists(datasets: dict[str, GeneratorDataset], out: Path, params) -> dict[str, dict]:
    from r2m.models import ensure_pretrained
    from r2m.training import train_specialist

    theta0 = ensure_pretrained(params)
    results = {}
    for name, ds in datasets.items():
        if not ds.is_seen:
            continue
        path = out / "specialists" / f"{name}.safetensors"
        t0 = time.perf_counter()
        result = train_specialist([ds], params, path, pretrained=theta0, name=name, progress=False)
        results[name] = {"path": str(path), "seconds": time.perf_counter() - t0, "val_auc": result.metrics["val_auc"]}
        print(f"  specialist {name}: val AUC {result.metrics['val_auc']:.3f} ({results[name]['seconds']:.0f} s)", flush=True)
    return results


def markdown(report: dict) -> str:
    lines = [f"# Embedded benchmark sanity (size {report['size']} per class, seed {report['seed']}, "
             f"strength {report.get('strength', 1.0):g})", ""]
    lines += [f"Generation: {report['generation_seconds']:.1f} s for {len(report['datasets'])} datasets "
              f"({report['workers']} workers, {os.cpu_count()} CPUs).", ""]
    lines += ["## Global statistics (≈ 0.5 = no giveaway)", "",
              "| dataset | role | test real/fake | logreg(mean,std) AUC | most telling single stat AUC | formats | JPEG files |",
              "|---|---|---|---|---|---|---|"]
    for name, d in report["datasets"].items():
        g = d["global"]
        lines.append(f"| {name} | {d['role']} | {d['test_real']}/{d['test_fake']} | {g['logreg_mean_std_auc']:.3f} | "
                     f"{g['max_single_stat_auc']:.3f} | {', '.join(g['formats'])} | {g['jpeg_files']} |")
    lines += ["", "## Family-specific artifact statistics (AUC fake vs real)", "",
              "| dataset | spectral peak ×2 | spectral peak ×4 | fine-scale energy |", "|---|---|---|---|"]
    for name, d in report["datasets"].items():
        a = d["artifacts"]
        lines.append(f"| {name} | {a['spectral_peak_x2']:.3f} | {a['spectral_peak_x4']:.3f} | {a['fine_scale_energy']:.3f} |")
    if report.get("auc"):
        names = list(report["datasets"])
        lines += ["", "## Specialists × datasets (test-split AUC)", "",
                  "| specialist \\ dataset | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for spec, row in report["auc"].items():
            cells = [f"**{row[n]:.3f}**" if n == spec else f"{row[n]:.3f}" for n in names]
            lines.append(f"| {spec} | " + " | ".join(cells) + " |")
        lines += ["", "Training: " + ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in report["specialists"].items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="work folder (datasets under <out>/generators)")
    ap.add_argument("--size", type=int, default=None, help="images per class per dataset (default: demo.size)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--strength", type=float, default=None, help="artifact strength (default: demo.strength)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-build", action="store_true", help="reuse <out>/generators")
    ap.add_argument("--no-train", action="store_true", help="skip the specialists × datasets table")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)

    params = load_params()
    size = args.size or params.demo.size
    seed = params.demo.seed if args.seed is None else args.seed
    strength = params.demo.strength if args.strength is None else args.strength
    root = args.out / "generators"
    report: dict = {"size": size, "seed": seed, "strength": strength, "workers": args.workers, "generation_seconds": float("nan")}
    if not args.no_build:
        t0 = time.perf_counter()
        build_demo_data(root, size, seed, params.demo.image_size, strength, workers=args.workers)
        report["generation_seconds"] = time.perf_counter() - t0
        print(f"generation: {report['generation_seconds']:.1f} s", flush=True)
    datasets = load_datasets(root)
    report["datasets"] = {}
    for name, ds in datasets.items():
        counts = ds.counts()["test"]
        report["datasets"][name] = {
            "role": ds.role, "family": ds.family, "domain": ds.domain,
            "test_real": counts["real"], "test_fake": counts["fake"],
            "global": global_statistic_check(ds), "artifacts": artifact_statistics(ds),
        }
        print(f"  {name}: global logreg AUC {report['datasets'][name]['global']['logreg_mean_std_auc']:.3f}", flush=True)
    if not args.no_train:
        # artifacts (θ0) go under the work folder: the bench never touches the project's artifacts/
        os.environ["R2M_ARTIFACTS"] = str(args.out / "artifacts")
        params = load_params()
        report["specialists"] = train_specialists(datasets, args.out, params)
        tensors = test_tensors(datasets, params)
        report["auc"] = {spec: score_all(Path(info["path"]), tensors) for spec, info in report["specialists"].items()}
    (args.out / "sanity.json").write_text(json.dumps(report, indent=2))
    text = markdown(report)
    (args.out / "sanity.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
