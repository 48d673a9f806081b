"""Image decoding with PIL, shared by validation, training, evaluation and serving.

Decoding is strict: the header is checked against the pixel limit before any pixel is
decompressed (decompression bombs), `verify()` checks the file structure and a full `load()`
catches truncated data that `verify()` lets through. Anything that fails becomes a
`DatasetError` naming the file.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from r2m.errors import DatasetError


def _set_pixel_limit(max_pixels: int | None) -> None:
    # PIL warns above MAX_IMAGE_PIXELS and refuses above twice that; align it with our limit so
    # its own check (run inside Image.open, before ours) never disagrees with the config.
    if max_pixels is not None:
        Image.MAX_IMAGE_PIXELS = max_pixels


def decode_image(data: bytes, source: Path | str = "<bytes>", max_pixels: int | None = None) -> Image.Image:
    """Decode image bytes into a fully loaded RGB image, or raise `DatasetError(source, reason)`.

    `max_pixels` (width × height) rejects decompression bombs from the header alone.
    """
    if not data:
        raise DatasetError(source, "not an image: the file is empty")
    _set_pixel_limit(max_pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if max_pixels is not None and width * height > max_pixels:
                    raise DatasetError(
                        source,
                        f"decompression bomb: {width}x{height} = {width * height} pixels "
                        f"> data.max_image_pixels = {max_pixels}",
                    )
                img.verify()
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                rgb = img.convert("RGB")
        except DatasetError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            limit = f" > data.max_image_pixels = {max_pixels}" if max_pixels is not None else ""
            raise DatasetError(source, f"decompression bomb: {err}{limit}") from None
        except UnidentifiedImageError:
            raise DatasetError(source, "not an image: PIL cannot identify the file") from None
        except Exception as err:  # PIL raises many types on malformed data (OSError, SyntaxError, ...)
            raise DatasetError(source, f"corrupt or truncated image: {type(err).__name__}: {err}") from None
    if rgb.width == 0 or rgb.height == 0:
        raise DatasetError(source, "not an image: zero width or height")
    return rgb


def load_image(path: Path | str, max_pixels: int | None = None) -> Image.Image:
    """Read an image file into a fully loaded RGB PIL image (`DatasetError` naming it on failure)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DatasetError(path, f"cannot read: {err.strerror or err}") from None
    return decode_image(data, path, max_pixels)
