import pytest
import torch

from r2m.checkpoint import BACKBONE_PREFIX, HEAD_KEYS, file_sha256, load_checkpoint, read_meta, save_checkpoint
from r2m.errors import CheckpointError
from r2m.models import build_detector, ensure_pretrained, load_detector, preprocessing


def test_forward_shapes_and_feature_is_pre_proj(params):
    detector = build_detector(params.model)
    x = torch.randn(3, 3, 64, 64)
    assert detector.backbone.proj is None
    features = detector.features(x)
    assert features.shape == (3, 128)  # pooled token before proj: the tower's width
    assert detector(x).shape == (3, 2)


def test_checkpoint_keys_follow_contract(params):
    tensors = build_detector(params.model).checkpoint_tensors()
    assert "backbone.transformer.resblocks.0.attn.in_proj_weight" in tensors
    assert tensors["head.weight"].shape == (2, 128)
    assert tensors["head.bias"].shape == (2,)
    assert all(k.startswith(BACKBONE_PREFIX) or k in HEAD_KEYS for k in tensors)
    assert "backbone.proj" not in tensors


def test_pretrained_written_once_and_hashed(params):
    path = ensure_pretrained(params)
    sha = file_sha256(path)
    tensors = load_checkpoint(path).tensors
    assert not any(k in tensors for k in HEAD_KEYS)  # θ0 holds backbone keys only
    assert read_meta(path)["sha256"] == sha
    assert ensure_pretrained(params) == path and file_sha256(path) == sha


def test_pretrained_tamper_detected(params):
    path = ensure_pretrained(params)
    tensors = load_checkpoint(path).tensors
    tensors["backbone.conv1.weight"] += 1
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        ensure_pretrained(params)


def test_round_trip_through_checkpoint(params, tmp_path):
    torch.manual_seed(1)
    detector = build_detector(params.model).eval()
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, detector.checkpoint_tensors(), {"kind": "specialist", "model": {"name": "r2m-tiny"}})
    loaded = load_detector(path)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded(x), detector(x))


def test_wrong_shapes_named(params, tmp_path):
    tensors = build_detector(params.model).checkpoint_tensors()
    tensors["head.weight"] = torch.zeros(2, 7)
    path = tmp_path / "bad.safetensors"
    save_checkpoint(path, tensors, {"model": {"name": "r2m-tiny"}})
    with pytest.raises(CheckpointError, match="head.weight"):
        load_detector(path)


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "evil.safetensors"
    path.write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(CheckpointError, match="evil.safetensors"):
        load_checkpoint(path)


def test_preprocessing_from_config(params):
    assert preprocessing(params) == {"image_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"}
