"""The All-in-one baseline (paper §4; docs/method.md, "Baselines"): one detector trained jointly on the union
of every seen dataset with the specialists' recipe, scored like any other model."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from r2m.checkpoint import read_meta, sidecar_path, write_json
from r2m.config import Params
from r2m.data import GeneratorDataset
from r2m.errors import TrainingError
from r2m.training.specialist import TrainResult, train_specialist

ALL_IN_ONE = "all-in-one"


def train_all_in_one(
    datasets: Sequence[GeneratorDataset],
    params: Params,
    out: Path | str,
    *,
    pretrained: Path | str,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune θ0 on the union of the seen datasets' train splits (unseen ones are skipped:
    they are evaluation-only). The checkpoint's sidecar has kind `all-in-one` and every
    dataset's data hash."""
    seen = sorted((d for d in datasets if d.role == "seen"), key=lambda d: d.name)
    if not seen:
        raise TrainingError("All-in-one needs at least one seen dataset")
    result = train_specialist(seen, params, out, pretrained=pretrained, name=ALL_IN_ONE, progress=progress)
    meta = read_meta(result.path)
    if meta.get("kind") != ALL_IN_ONE:  # one seen dataset: train_specialist calls it a specialist
        write_json(sidecar_path(result.path), {**meta, "kind": ALL_IN_ONE})
    return result
