"""Scoring merged state dicts on the seen datasets' validation splits (hyperparameter choice).

Only `val` splits of seen datasets are ever read here: unseen sets never influence a choice.
Images are decoded and transformed once and reused for every grid point.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from r2m.config import Params
from r2m.data import GeneratorDataset, ImageDataset, build_transform
from r2m.errors import EvaluationError
from r2m.evaluation.metrics import auc
from r2m.evaluation.scoring import eval_batch_size, score_batches
from r2m.models.detector import build_detector, image_size, pick_device


class ValidationScorer:
    """`scorer(state_dict, hparams) -> mean validation AUC` over the seen datasets."""

    def __init__(self, params: Params, seen: Sequence[GeneratorDataset], batch_size: int | None = None):
        unseen = [d.name for d in seen if d.role != "seen"]
        if unseen:
            raise EvaluationError(f"dataset '{unseen[0]}' is unseen: it must never choose hyperparameters")
        self.device = pick_device()
        self.detector = build_detector(params.model).to(self.device).eval()
        transform = build_transform(False, image_size(params.model.name), params.train)
        self.tasks = []
        for dataset in seen:
            loader = DataLoader(ImageDataset(dataset.split("val"), transform), batch_size=batch_size or eval_batch_size(self.device))
            batches = [(x, y) for x, y in loader]
            labels = torch.cat([y for _, y in batches]).numpy()
            self.tasks.append((dataset.name, [x for x, _ in batches], labels))

    def __call__(self, state_dict: dict[str, torch.Tensor], hparams: dict | None = None) -> float:
        self.detector.load_checkpoint_tensors(state_dict, source="merged state dict")
        aucs = []
        for name, batches, labels in self.tasks:
            aucs.append(auc(labels, score_batches(self.detector, batches, self.device), name))
        return float(np.mean(aucs))
