"""What real data and real users ran into."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from fixtures import make_generator_dataset, seed_mlflow_store
from PIL import Image
from typer.testing import CliRunner

from r2m.checkpoint import file_sha256, save_checkpoint
from r2m.cli import app
from r2m.config import DataConfig, ModelConfig, ServeConfig, load_params
from r2m.data import decode_image, validate_dataset
from r2m.errors import DatasetError
from r2m.models import build_detector

runner = CliRunner()


# ---------------------------------------------------------------- splits of real datasets


def test_unseen_dataset_is_all_test_unless_its_manifest_lists_splits(project, params):
    root = project / "data" / "generators"
    unseen = validate_dataset(make_generator_dataset(root, "un-a", role="unseen", n_per_class=24, groups=6),
                              root, params.data)
    assert {s.split for s in unseen.samples} == {"test"} and len(unseen.split("test")) == 48
    groups = sorted({s.group for s in unseen.samples})
    listed = make_generator_dataset(root, "un-b", role="unseen", n_per_class=24, groups=6,
                                    splits={"val": [g.replace("un-a", "un-b") for g in groups[:2]],
                                            "test": [g.replace("un-a", "un-b") for g in groups[2:]]})
    explicit = validate_dataset(listed, root, params.data)
    assert {s.split for s in explicit.samples} == {"val", "test"}  # the manifest's lists win
    seen = validate_dataset(make_generator_dataset(root, "se-a", n_per_class=24, groups=6), root, params.data)
    assert {s.split for s in seen.samples} == {"train", "val", "test"}


def _png(path, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_one_group_rejection_names_the_grouping_rule_and_the_group(project, params):
    root = project / "data" / "generators"
    folder = root / "ffhq-like"
    for i in range(12):  # a public set's names: <dataset>__<n>, so every real photo is source 'ffhq'
        _png(folder / "real" / f"ffhq__{i:05d}.png", i)
        _png(folder / "fake" / f"gen{i}__0.png", 100 + i)
    (folder / "generator.yaml").write_text(yaml.safe_dump({"name": "ffhq-like", "family": "EFS", "domain": "ff",
                                                           "role": "seen"}))
    with pytest.raises(DatasetError) as err:
        validate_dataset(folder, root, params.data)
    reason = err.value.reason
    assert "12 real image(s) form 1 group(s) ('ffhq')" in reason
    assert "up to the first '__' (<source>__<n>.png)" in reason and "frames/<video_id>/" in reason


# ---------------------------------------------------------------- formats and sizes: one list, one limit


def _image(fmt: str, size=(48, 40), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format=fmt)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width × height; its (tiny) pixel data is never decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_gif_is_refused_by_validation_and_the_server_alike(project, params, served):
    root = project / "data" / "generators"
    folder = make_generator_dataset(root, "gif-ff", n_per_class=8, groups=4)
    (folder / "fake" / "gif-ff-src0__000.png").write_bytes(_image("GIF"))  # a GIF behind a .png name
    with pytest.raises(DatasetError, match="image format GIF is not accepted \\(accepted: PNG, JPEG, WEBP"):
        validate_dataset(folder, root, params.data)
    res = served.post("/v1/detect", files={"file": ("anim.gif", _image("GIF"), "image/gif")})
    assert res.status_code == 415, res.text
    assert "image format GIF is not accepted (accepted: PNG, JPEG, WEBP" in res.json()["detail"]
    for fmt in ("PNG", "JPEG", "WEBP"):  # what validation accepts, the server accepts
        assert served.post("/v1/detect", files={"file": (f"x.{fmt}", _image(fmt), "image/*")}).status_code == 200


def test_a_48_megapixel_photo_is_accepted_and_a_bomb_refused_from_its_header(served):
    photo = _image("JPEG", size=(8000, 6000), mode="L")  # a 48 MP phone photo (uniform: small file)
    assert decode_image(photo, "phone.jpg", DataConfig().max_image_pixels).size == (8000, 6000)
    res = served.post("/v1/detect", files={"file": ("phone.jpg", photo, "image/jpeg")})
    assert res.status_code == 200, res.text
    bomb = _png_header_only(40_000, 40_000)  # 1.6 gigapixel claimed in a ~100-byte file
    with pytest.raises(DatasetError) as err:
        decode_image(bomb, "bomb.png", DataConfig().max_image_pixels)
    assert err.value.reason == "decompression bomb: 40000x40000 = 1600000000 pixels > data.max_image_pixels = 200000000"
    assert served.post("/v1/detect", files={"file": ("b.png", bomb, "image/png")}).status_code == 413


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from r2m.export.onnx_export import export_checkpoint

    root = tmp_path_factory.mktemp("real-data")
    torch.manual_seed(0)
    ckpt = root / "merged.safetensors"
    save_checkpoint(ckpt, build_detector(ModelConfig(name="r2m-tiny")).checkpoint_tensors(),
                    {"kind": "merged", "method": "r2m", "model": {"name": "r2m-tiny"}})
    params = load_params(root=root, export={"exporter": "torchscript"})
    return {"ckpt": ckpt, "onnx": export_checkpoint(ckpt, root / "model.onnx", params, int8=False).onnx_path,
            "root": root, "params": params}


@pytest.fixture(scope="module")
def served(exported):
    from r2m.export.publish import publish
    from r2m.serving.app import create_app

    repo = exported["root"] / "repo"
    publish(exported["onnx"], repo, exported["params"].export)
    serve = ServeConfig(max_upload_bytes=20_000_000)
    with TestClient(create_app(repo, serve, DataConfig(), poll=False)) as client:
        yield client


# ---------------------------------------------------------------- the registry's verdicts


def _run(client, params) -> str:
    from r2m.tracking import mlflow_store

    exp = mlflow_store.experiment_id(params, mlflow_store.EXPERIMENT_MERGES, client)
    run_id = client.create_run(exp).info.run_id
    client.set_terminated(run_id)
    return run_id


@pytest.fixture
def store(project):
    from r2m.tracking import mlflow_store

    seed_mlflow_store(project)
    params = load_params(root=project)
    return params, mlflow_store.client(params)


def test_models_shows_a_rejected_specialists_verdict(store):
    from r2m.tracking import registry

    params, client = store
    for generator, status in (("fs-ok", "accepted"), ("fs-bad", "rejected")):
        mv = registry.register_specialist(client, _run(client, params), {"generator": generator, "sha256": "a" * 64})
        client.set_model_version_tag(registry.specialist_model_name(generator), mv.version, "status", status)
    listing = runner.invoke(app, ["models"])
    assert listing.exit_code == 0, listing.output
    rows = {line.split()[0]: line.split() for line in listing.output.splitlines()[1:]}
    assert rows["specialist-fs-bad"][:3] == ["specialist-fs-bad", "1", "-"]
    assert rows["specialist-fs-bad"][3] == "rejected" and rows["specialist-fs-ok"][3] == "accepted"
    assert listing.output.splitlines()[0].split()[3] == "verdict"


def test_publish_refuses_a_model_that_never_passed_the_gate_unless_forced(store, exported, tmp_path):
    from r2m.tracking import registry

    params, client = store
    repo = tmp_path / "repo"
    onnx = str(exported["onnx"])
    res = runner.invoke(app, ["publish", "--onnx", onnx, "--repository", str(repo)])
    assert res.exit_code == 2 and "never passed the gate" in res.output and "--force" in res.output
    assert not repo.exists()

    sha = file_sha256(exported["ckpt"])
    registry.register_candidate(client, _run(client, params), gate_passed=False,
                                gate_reason="gate failed: max_drop 0.3 > 0.1", meta={"sha256": sha})
    res = runner.invoke(app, ["publish", "--onnx", onnx, "--repository", str(repo)])
    assert res.exit_code == 2 and "r2m-detector v1 failed the gate (gate failed: max_drop 0.3 > 0.1)" in res.output
    assert not repo.exists()
    res = runner.invoke(app, ["publish", "--onnx", onnx, "--repository", str(repo), "--force"])
    assert res.exit_code == 0 and "warning" in res.output and "version 1" in res.output

    registry.register_candidate(client, _run(client, params), gate_passed=True, gate_reason="gate passed",
                                meta={"sha256": sha})
    res = runner.invoke(app, ["publish", "--onnx", onnx, "--repository", str(repo)])
    assert res.exit_code == 0 and "warning" not in res.output and "version 2" in res.output


# ---------------------------------------------------------------- evaluation and training


def test_drop_is_blank_for_a_seen_task_without_a_specialist(project, params):
    root = project / "data" / "generators"
    fs_a = make_generator_dataset(root, "fs-a", family="FS", n_per_class=12, groups=6)
    fs_cdf = make_generator_dataset(root, "fs-cdf", family="FS", domain="cdf", n_per_class=12, groups=6, seed=1)
    fr_b = make_generator_dataset(root, "fr-b", family="FR", n_per_class=12, groups=6, seed=2, artifact="band")
    torch.manual_seed(0)
    tensors = build_detector(ModelConfig(name="r2m-tiny")).checkpoint_tensors()
    spec = project / "spec-fs-a.safetensors"
    save_checkpoint(spec, tensors, {"kind": "specialist", "generator": "fs-a", "families": ["FS"],
                                    "model": {"name": "r2m-tiny"}})
    merged = project / "merged.safetensors"  # R²M of one specialist is that specialist
    save_checkpoint(merged, tensors, {"kind": "merged", "method": "r2m", "model": {"name": "r2m-tiny"}})
    res = runner.invoke(app, ["evaluate", str(fs_a), str(fs_cdf), str(fr_b), "--model", str(merged),
                              "--specialist", str(spec)])
    assert res.exit_code == 0, res.output
    drop = res.output[res.output.index("**DROP"):].split("\n\n")[1].splitlines()
    cells = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in drop[2:]}
    assert cells["fs-a"] == "0.000 [0.000, 0.000]"  # its own specialist: the same scores on every resample
    assert cells["fs-cdf"] == "0.000 [0.000, 0.000]"  # Protocol 2: the FS specialist in another domain
    assert cells["fr-b"] == "–"  # no FR specialist: nothing to retain, no DROP


def test_training_keeps_the_best_validation_epoch_or_the_last(project):
    from r2m.data.dataset import ImageDataset
    from r2m.data.transforms import build_transform
    from r2m.models import ensure_pretrained, load_detector
    from r2m.training import train_specialist
    from r2m.training.specialist import _auc, predict_scores

    root = project / "data" / "generators"
    params = load_params(root=project, model={"name": "r2m-tiny", "lr": 1e-3},
                         train={"epochs": 3, "batch_size": 16, "keep": "best"})
    pretrained = ensure_pretrained(params)
    for seed in range(4):  # label noise: validation AUC wanders; find a run where the last epoch is not the best
        folder = make_generator_dataset(root / str(seed), "noise-ff", n_per_class=24, groups=24, artifact="none", seed=seed)
        dataset = validate_dataset(folder, root / str(seed), params.data)
        out = project / f"noise-{seed}.safetensors"
        result = train_specialist([dataset], params, out, pretrained=pretrained, progress=False)
        aucs = [h["val_auc"] for h in result.history]
        if aucs[-1] < max(aucs):
            break
    assert aucs[-1] < max(aucs), aucs
    # the best validation AUC; of equal AUCs the lower validation loss, then the earliest epoch
    best = min(result.history, key=lambda h: (-h["val_auc"], h["val_loss"], h["epoch"]))["epoch"]
    assert result.metrics["best_epoch"] == best and result.metrics["val_auc"] == max(aucs)
    assert result.metrics["last_val_auc"] == aucs[-1]
    # the weights saved are that epoch's: re-scored on validation they give its AUC, not the last one's
    loader = torch.utils.data.DataLoader(ImageDataset(dataset.split("val"), build_transform(False, 64, params.train)),
                                         batch_size=16)
    scores, labels = predict_scores(load_detector(out), loader, torch.device("cpu"))
    assert _auc(labels, scores) == pytest.approx(max(aucs), abs=1e-9)

    # train.keep: last keeps the final epoch's weights whatever validation says (same data, same seed)
    last = load_params(root=project, model={"name": "r2m-tiny", "lr": 1e-3},
                       train={"epochs": 3, "batch_size": 16, "keep": "last"})
    out_last = project / f"noise-{seed}-last.safetensors"
    kept = train_specialist([dataset], last, out_last, pretrained=pretrained, progress=False)
    assert [h["val_auc"] for h in kept.history] == aucs  # the same training, epoch for epoch
    assert kept.metrics["best_epoch"] == 3 and kept.metrics["val_auc"] == aucs[-1]
    scores, labels = predict_scores(load_detector(out_last), loader, torch.device("cpu"))
    assert _auc(labels, scores) == pytest.approx(aucs[-1], abs=1e-9)


def test_a_soup_specialist_is_the_mean_of_its_members(project):
    from r2m.checkpoint import load_checkpoint
    from r2m.data.dataset import ImageDataset
    from r2m.data.transforms import build_transform
    from r2m.models import ensure_pretrained, load_detector
    from r2m.training import train_specialist
    from r2m.training.specialist import _auc, member_seeds, predict_scores

    root = project / "data" / "generators"
    folder = make_generator_dataset(root, "soup-ff", n_per_class=24, groups=12, seed=3)
    train = {"epochs": 2, "batch_size": 16, "keep": "last"}
    one = load_params(root=project, model={"name": "r2m-tiny", "lr": 1e-3}, train=train)
    two = load_params(root=project, model={"name": "r2m-tiny", "lr": 1e-3}, train=train | {"soup": 2})
    dataset = validate_dataset(folder, root, one.data)
    pretrained = ensure_pretrained(one)
    single = train_specialist([dataset], one, project / "one.safetensors", pretrained=pretrained, progress=False)
    soup = train_specialist([dataset], two, project / "two.safetensors", pretrained=pretrained, progress=False)

    seeds = member_seeds(1024, 2)
    assert seeds[0] == 1024 and seeds[1] != 1024 and member_seeds(1, 2)[1] != member_seeds(2, 2)[1]
    members = [[h for h in soup.history if h["member"] == m] for m in (0, 1)]
    assert [h["step"] for h in soup.history] == [1, 2, 3, 4]
    # member 0 is the single fine-tune (same seed, same start), epoch for epoch; member 1 trained on its own seed
    assert [h["val_auc"] for h in members[0]] == [h["val_auc"] for h in single.history]
    assert [h["train_loss"] for h in members[1]] != [h["train_loss"] for h in members[0]]

    loader = torch.utils.data.DataLoader(ImageDataset(dataset.split("val"), build_transform(False, 64, one.train)),
                                         batch_size=16)
    scores, labels = predict_scores(load_detector(soup.path), loader, torch.device("cpu"))
    assert soup.metrics["val_auc"] == pytest.approx(_auc(labels, scores), abs=1e-9)  # the soup's own AUC
    # the saved weights are the mean: 2 * soup - member 0 is member 1, which scores member 1's last epoch
    mean, first = load_checkpoint(soup.path).tensors, load_checkpoint(single.path).tensors
    second = {k: 2 * mean[k] - first[k] if mean[k].is_floating_point() else mean[k] for k in mean}
    assert any(not torch.equal(second[k], first[k]) for k in first)
    detector = load_detector(single.path)
    detector.load_checkpoint_tensors(second)
    scores, labels = predict_scores(detector, loader, torch.device("cpu"))
    assert _auc(labels, scores) == pytest.approx(members[1][-1]["val_auc"], abs=1e-4)


def test_run_without_the_onnxruntime_extra_names_the_extras(project):
    launcher = ("import sys; sys.modules['onnxruntime'] = None; sys.argv = ['r2m', 'run']; "
                "from r2m.cli import main; main()")  # an environment installed without .[cpu] / .[gpu]
    proc = subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True, cwd=project,
                          env={**os.environ, "R2M_PROJECT_ROOT": str(project)})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("r2m run: error: ONNX Runtime is not installed")
    assert "pip install -e '.[cpu]'" in lines[0] and "'.[gpu]'" in lines[0]
    assert not (project / "artifacts").exists()  # it stopped before any work
