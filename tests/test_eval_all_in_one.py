"""The All-in-one baseline: θ0 fine-tuned on the union of the seen datasets (unseen ones skipped)."""

import pytest
from fixtures import make_generator_dataset

from r2m.checkpoint import read_meta
from r2m.config import load_params
from r2m.data import validate_dataset
from r2m.errors import TrainingError
from r2m.models import ensure_pretrained
from r2m.training.all_in_one import train_all_in_one


def test_all_in_one_trains_on_seen_data_only(project):
    params = load_params(root=project, model={"name": "r2m-tiny", "lr": 3e-4}, train={"epochs": 1})
    root = project / "data" / "generators"
    seen = validate_dataset(make_generator_dataset(root, "sq-ff", n_per_class=8, groups=4), root, params.data)
    unseen = validate_dataset(
        make_generator_dataset(root, "ck-x", role="unseen", artifact="checker", n_per_class=8, groups=4),
        root, params.data)
    out = project / "all-in-one.safetensors"
    train_all_in_one([unseen, seen], params, out, pretrained=ensure_pretrained(params), progress=False)
    meta = read_meta(out)
    # one seen dataset: train_specialist would call it a specialist; it is still the All-in-one
    assert meta["kind"] == "all-in-one" and meta["generator"] == "all-in-one"
    assert meta["generators"] == ["sq-ff"]
    with pytest.raises(TrainingError, match="at least one seen dataset"):
        train_all_in_one([unseen], params, project / "x.safetensors", pretrained=ensure_pretrained(params))
