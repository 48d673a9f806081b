"""Transforms (DF40 recipe, seeded), image loading, and the torch dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from r2m.config import AugmentConfig, TrainConfig
from r2m.data import ImageDataset, Sample, build_transform, load_image, to_pixel_array
from r2m.data.transforms import OddKernelGaussianBlur
from r2m.errors import DatasetError

SIZE = 32
NO_AUGMENT = AugmentConfig(hflip_p=0, rotate_p=0, blur_p=0, brightness_p=0, contrast_p=0, jpeg_p=0)


def photo(seed: int = 0, size: int = 48) -> Image.Image:
    """A textured RGB image: smooth gradients plus noise, so every augmentation shows."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    base = np.stack([xx * 4, yy * 4, (xx + yy) * 2], axis=-1) % 256
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


def only(**probabilities) -> TrainConfig:
    return TrainConfig(augment=NO_AUGMENT.model_copy(update=probabilities))


def test_eval_transform_is_resize_and_normalise():
    out = build_transform(False, SIZE)(photo())
    assert out.shape == (3, SIZE, SIZE) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), to_pixel_array(photo(), SIZE, (0.5,) * 3, (0.5,) * 3), atol=1e-6)
    white = build_transform(False, SIZE)(Image.new("RGB", (10, 20), (255, 255, 255)))
    assert torch.allclose(white, torch.ones_like(white))  # (1 − 0.5) / 0.5
    mean_std = TrainConfig(mean=(0.2, 0.4, 0.6), std=(0.1, 0.2, 0.3))
    black = build_transform(False, SIZE, mean_std)(Image.new("RGB", (SIZE, SIZE)))
    assert torch.allclose(black[:, 0, 0], torch.tensor([-2.0, -2.0, -2.0]))


def test_eval_transform_matches_what_the_served_model_records(params):
    from r2m.models import preprocessing
    from r2m.runtime.preprocess import Preprocessing

    spec = preprocessing(params)
    served = Preprocessing.from_dict(spec)(photo(3))
    trained = build_transform(False, spec["image_size"], params.train)(photo(3)).numpy()
    np.testing.assert_allclose(trained, served, atol=1e-5)


def test_train_transform_is_seeded_by_torch():
    transform = build_transform(True, SIZE, TrainConfig())
    image = photo(1)
    torch.manual_seed(7)
    first = [transform(image) for _ in range(6)]
    torch.manual_seed(7)
    second = [transform(image) for _ in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not all(torch.equal(first[0], x) for x in first[1:])  # draws differ within a run
    assert all(x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32 for x in first)


def test_without_augmentation_train_equals_eval():
    image = photo(2)
    torch.manual_seed(0)
    assert torch.equal(build_transform(True, SIZE, only())(image), build_transform(False, SIZE)(image))


def test_each_augmentation_applies_with_its_probability():
    image, plain = photo(4), build_transform(False, SIZE)(photo(4))
    flipped = build_transform(True, SIZE, only(hflip_p=1.0))(image)
    assert torch.equal(flipped, plain.flip(-1))
    for p_name in ("rotate_p", "blur_p", "brightness_p", "contrast_p", "jpeg_p"):
        torch.manual_seed(0)
        out = torch.stack([build_transform(True, SIZE, only(**{p_name: 1.0}))(image) for _ in range(4)])
        diff = (out - plain).abs().mean(dim=(1, 2, 3))
        assert (diff > 1e-3).any(), p_name  # it changes the image...
        assert (diff < 0.5).all(), p_name  # ...but only mildly (±10°, k ≤ 7, ±0.1, quality ≥ 40)


def test_blur_kernels_are_odd_sizes_in_range():
    blur = OddKernelGaussianBlur((3, 7))
    assert blur.kernels == [3, 5, 7]
    with pytest.raises(ValueError, match="no odd kernel"):
        OddKernelGaussianBlur((4, 4))


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK", "I;16"])
def test_load_image_returns_rgb(tmp_path, mode):
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")  # only accepted formats (data.extensions)
    Image.new(mode, (9, 7)).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (9, 7)


def test_load_image_names_the_bad_file(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DatasetError) as info:
        load_image(path)
    assert info.value.path == path


def test_image_dataset_batches(tmp_path):
    samples = []
    for i in range(5):
        path = tmp_path / f"{i}.png"
        photo(i, size=20).save(path)
        samples.append(Sample(path, i % 2, f"g{i}", "train"))
    dataset = ImageDataset(samples, build_transform(False, SIZE))
    assert len(dataset) == 5 and dataset.labels == [0, 1, 0, 1, 0]
    x, y = dataset[1]
    assert x.shape == (3, SIZE, SIZE) and y == 1
    batch_x, batch_y = next(iter(DataLoader(dataset, batch_size=4)))
    assert batch_x.shape == (4, 3, SIZE, SIZE) and batch_y.tolist() == [0, 1, 0, 1]


@pytest.mark.parametrize("photo_name", ["astronaut", "chelsea", "coffee", "camera"])
def test_server_preprocessing_equals_training_eval_transform_on_real_photos(params, photo_name):
    """The torch-free preprocessing the server runs (numpy + PIL, from the model's metadata) gives
    the pixels training's eval transform gives, on real photographs of every shape and mode, also
    after the server's own decoder read them from JPEG and PNG bytes."""
    import io

    from skimage import data as photos

    from r2m.data import decode_image
    from r2m.models import preprocessing
    from r2m.runtime.preprocess import Preprocessing

    spec = preprocessing(params)
    served, trained = Preprocessing.from_dict(spec), build_transform(False, spec["image_size"], params.train)
    image = Image.fromarray(getattr(photos, photo_name)())  # camera is greyscale: both convert to RGB
    for fmt in (None, "JPEG", "PNG"):
        if fmt:
            buf = io.BytesIO()
            image.save(buf, format=fmt)
            decoded = decode_image(buf.getvalue(), f"{photo_name}.{fmt.lower()}")
        else:
            decoded = image
        np.testing.assert_allclose(served(decoded), trained(decoded).numpy(), atol=1e-6, rtol=0)
        assert served(decoded).shape == (3, spec["image_size"], spec["image_size"])
