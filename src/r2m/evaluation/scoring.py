"""Batched inference of checkpoints over dataset splits (CUDA when present), into an `Evaluation`.

Score = P(fake) = softmax(logits)[:, 1] (docs/method.md, "The detector"). Each task's images are decoded and
transformed once and kept in memory while they fit `cache_bytes`, so scoring many models (the
specialists, every merge method, All-in-one, the champion) does not decode them again. With a
`score_cache` folder, the scores of a checkpoint on a dataset split are also kept on disk, keyed
by the checkpoint's sha256 and the dataset's content hash, so the loop's successive re-merges
score each specialist and the champion once, not at every step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from r2m.checkpoint import file_sha256, read_meta
from r2m.config import Params
from r2m.data import GeneratorDataset, ImageDataset, build_transform
from r2m.errors import CheckpointError, EvaluationError
from r2m.fileio import atomic_write_json
from r2m.names import specialist_name
from r2m.evaluation.metrics import task_metrics
from r2m.evaluation.protocol import Evaluation, ModelInfo, Task
from r2m.models.detector import Detector, image_size, load_detector, pick_device, sidecar_model_name

# Scoring batch: on CPU small batches keep the early feature maps in cache (measured, 64 px
# EfficientNet-Lite0 on 2 cores: ~1500 img/s at 32, ~800 at 64); GPUs want large batches.
EVAL_BATCH_SIZE = 32
CUDA_EVAL_BATCH_SIZE = 128


def eval_batch_size(device: torch.device | None = None) -> int:
    """Images per scoring batch on `device` (default: the one picked for scoring)."""
    device = device or pick_device()
    return CUDA_EVAL_BATCH_SIZE if device.type == "cuda" else EVAL_BATCH_SIZE


def model_info(name: str, path: Path | str, kind: str | None = None) -> ModelInfo:
    """What the sidecar says about a checkpoint: kind (specialist, merged, all-in-one...) and,
    for a specialist, the generator it was trained on."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such checkpoint file")
    meta = read_meta(path)
    kind = kind or meta.get("kind", "merged")
    generator = meta.get("generator") if kind == "specialist" else None
    families = meta.get("families") or []
    family = families[0] if kind == "specialist" and len(families) == 1 else None
    return ModelInfo(name, kind, generator, str(path), meta.get("sha256") or file_sha256(path), family)


def default_model_name(path: Path | str) -> str:
    """`specialist-<generator>` for a specialist, `all-in-one`, the merge method's name for a
    merged checkpoint, else the file stem."""
    meta = read_meta(path)
    kind = meta.get("kind")
    if kind == "specialist" and meta.get("generator"):
        return specialist_name(meta["generator"])
    if kind == "all-in-one":
        return "all-in-one"
    method = meta.get("method")
    if kind == "merged" and isinstance(method, str):
        return method
    if kind == "merged" and isinstance(method, dict) and method.get("name"):
        return str(method["name"])
    return Path(path).name.removesuffix(".safetensors")


def task_of(dataset: GeneratorDataset) -> Task:
    return Task(dataset.name, dataset.family, dataset.domain, dataset.role)


class _TaskInputs:
    """The transformed images of one task's split: cached tensors, or a loader streamed again."""

    def __init__(self, dataset: GeneratorDataset, split: str, size: int, params: Params,
                 batch_size: int, budget: list[int]):
        self.samples = dataset.split(split)
        if not self.samples:
            raise EvaluationError(f"task '{dataset.name}': its '{split}' split is empty")
        self.name = dataset.name
        self.labels = np.array([s.label for s in self.samples], dtype=np.int64)
        self.groups = [s.group for s in self.samples]
        self.loader = DataLoader(
            ImageDataset(self.samples, build_transform(False, size, params.train)),
            batch_size=batch_size,
            shuffle=False,
            num_workers=params.train.num_workers,
            pin_memory=torch.cuda.is_available(),
        )
        self.cached: list[torch.Tensor] | None = None
        need = len(self.samples) * 3 * size * size * 4
        if need <= budget[0]:
            budget[0] -= need
            self.cached = [images for images, _ in self.loader]

    def batches(self) -> Iterator[torch.Tensor]:
        if self.cached is not None:
            yield from self.cached
        else:
            for images, _ in self.loader:
                yield images


@torch.no_grad()
def score_batches(detector: Detector, batches, device: torch.device) -> np.ndarray:
    """P(fake) for every image of `batches`, in order."""
    detector.eval()
    out = [
        torch.softmax(detector(images.to(device, non_blocking=True)).float(), dim=1)[:, 1].cpu()
        for images in batches
    ]
    return torch.cat(out).numpy().astype(np.float64)


def evaluate_models(
    models: Mapping[str, Path | str],
    datasets: Sequence[GeneratorDataset],
    params: Params,
    *,
    split: str = "test",
    kinds: Mapping[str, str] | None = None,
    progress: bool = True,
    batch_size: int | None = None,
    cache_bytes: int = 2 << 30,
    device: torch.device | None = None,
    score_cache: Path | None = None,
) -> Evaluation:
    """Score every model (`name -> checkpoint`) on every dataset's `split`: AUC, EER, AP, video
    AUC per task. `kinds` overrides a checkpoint's sidecar kind (e.g. "champion")."""
    if not models:
        raise EvaluationError("no model to evaluate")
    if not datasets:
        raise EvaluationError("no dataset to evaluate on")
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        raise EvaluationError(f"a dataset appears twice among {names}")
    kinds = dict(kinds or {})
    infos = {name: model_info(name, path, kinds.get(name)) for name, path in models.items()}
    device = device or pick_device()
    batch_size = batch_size or eval_batch_size(device)
    budget = [cache_bytes]
    inputs: dict[tuple[str, int], _TaskInputs] = {}
    evaluation = Evaluation(tasks=[task_of(d) for d in datasets], models=infos, metrics={}, scores={})
    bar = tqdm(total=len(models) * len(datasets), desc="evaluate", disable=not progress, leave=False)
    for name, path in models.items():
        model_name = sidecar_model_name(read_meta(path).get("model"), path) or params.model.name
        size = image_size(model_name)
        evaluation.metrics[name], evaluation.scores[name] = {}, {}
        detector = None
        digest = file_sha256(path) if score_cache is not None else None  # the file as it is now
        for dataset in datasets:
            bar.set_postfix_str(f"{name} on {dataset.name}")
            cached = None
            if score_cache is not None:
                cached = Path(score_cache) / f"{digest[:32]}-{dataset.data_hash[:16]}-{split}-{size}.json"
            if cached is not None and cached.is_file():
                samples = dataset.split(split)
                labels = np.array([s.label for s in samples], dtype=np.int64)
                groups = [s.group for s in samples]
                scores = np.array(json.loads(cached.read_text())["scores"], dtype=np.float64)
            else:
                key = (dataset.name, size)
                if key not in inputs:
                    inputs[key] = _TaskInputs(dataset, split, size, params, batch_size, budget)
                task = inputs[key]
                detector = detector or load_detector(path, device=device)
                labels, groups = task.labels, task.groups
                scores = score_batches(detector, task.batches(), device)
                if cached is not None:
                    atomic_write_json(cached, {"checkpoint": params.relative(path), "dataset": dataset.name,
                                               "scores": scores.tolist()}, indent=None, fsync=False)
            evaluation.metrics[name][dataset.name] = task_metrics(dataset.name, labels, scores, groups)
            evaluation.scores[name][dataset.name] = (labels.tolist(), scores.tolist())
            evaluation.groups.setdefault(dataset.name, [str(g) for g in groups])
            bar.update(1)
        del detector
    bar.close()
    return evaluation

