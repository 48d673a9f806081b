import subprocess
import sys

import torch
from fixtures import make_generator_dataset

from r2m.checkpoint import file_sha256, load_checkpoint, read_meta
from r2m.data import validate_dataset
from r2m.models import ensure_pretrained
from r2m.training import train_specialist


def test_specialist_beats_chance_and_records_lineage(params, project):
    root = project / "data" / "generators"
    folder = make_generator_dataset(root, "sq-ff", n_per_class=48, groups=12)
    dataset = validate_dataset(folder, root, params.data)
    pretrained = ensure_pretrained(params)
    out = project / "sq-ff.safetensors"
    result = train_specialist([dataset], params, out, pretrained=pretrained, name="sq-ff", progress=False)

    assert result.metrics["val_auc"] > 0.8
    assert len(result.history) == params.train.epochs
    meta = read_meta(out)
    assert meta["theta0_sha256"] == file_sha256(pretrained)
    assert meta["data_hash"] == dataset.data_hash
    assert meta["generator"] == "sq-ff"
    assert meta["recipe"]["seed"] == 1024 and meta["recipe"]["backbone_lr"] == 3e-4
    tensors = load_checkpoint(out).tensors
    theta0 = load_checkpoint(pretrained).tensors
    moved = sum(not torch.equal(tensors[k], theta0[k]) for k in theta0)
    assert moved > len(theta0) // 2  # the backbone was fine-tuned, not only the head


def test_training_is_deterministic_on_cpu(params, project):
    root = project / "data" / "generators"
    folder = make_generator_dataset(root, "ck-ff", artifact="checker", n_per_class=16, groups=6)
    dataset = validate_dataset(folder, root, params.data)
    pretrained = ensure_pretrained(params)
    a = train_specialist([dataset], params, project / "a.safetensors", pretrained=pretrained, progress=False)
    b = train_specialist([dataset], params, project / "b.safetensors", pretrained=pretrained, progress=False)
    ta, tb = load_checkpoint(a.path).tensors, load_checkpoint(b.path).tensors
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_cli_train_rejects_bad_dataset_without_traceback(project):
    root = project / "data" / "generators"
    folder = make_generator_dataset(root, "bad-ff", n_per_class=8, groups=4)
    (folder / "fake" / "bad-ff-src0__000.png").write_text("this is not an image")
    out = project / "never.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "r2m.cli", "train", str(folder), "--out", str(out)],
        capture_output=True, text=True, cwd=project,
    )
    assert proc.returncode == 2
    assert "bad-ff-src0__000.png" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
