"""Image decoding with PIL, shared by validation, training, evaluation and serving.

Decoding is strict: the file must hold one of the accepted formats (`data.extensions`, mapped
by `r2m.config.IMAGE_FORMATS`: the one list validation and the server share); its width ×
height, read from the header before any pixel is decompressed, must not exceed
`data.max_image_pixels` (decompression bombs); `verify()` checks the file structure and a full
`load()` catches truncated data that `verify()` lets through. Anything that fails becomes a
`DatasetError` naming the file.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

from PIL import Image, UnidentifiedImageError

from r2m.config import IMAGE_FORMATS
from r2m.errors import DatasetError

# PIL's own bomb check (a warning above MAX_IMAGE_PIXELS, an error above twice that) would fire
# inside Image.open with its own limits; ours below, from the header, is the one limit there is.
Image.MAX_IMAGE_PIXELS = None

ALL_FORMATS = tuple(dict.fromkeys(IMAGE_FORMATS.values()))
ALIASES = {"MPO": "JPEG"}  # cameras' multi-picture JPEGs: PIL names them MPO and decodes the first picture


def decode_image(data: bytes, source: Path | str = "<bytes>", max_pixels: int | None = None,
                 formats: Sequence[str] = ALL_FORMATS) -> Image.Image:
    """Decode image bytes into a fully loaded RGB image, or raise `DatasetError(source, reason)`.

    `formats` are the accepted PIL format names (`DataConfig.formats`); `max_pixels`
    (width × height) rejects decompression bombs from the header alone.
    """
    if not data:
        raise DatasetError(source, "not an image: the file is empty")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if ALIASES.get(img.format, img.format) not in formats:
                raise DatasetError(source, f"image format {img.format} is not accepted (accepted: "
                                           f"{', '.join(formats)}; data.extensions)")
            width, height = img.size  # from the header: nothing is decompressed yet
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
    except UnidentifiedImageError:
        raise DatasetError(source, "not an image: PIL cannot identify the file") from None
    except Exception as err:  # PIL raises many types on malformed data (OSError, SyntaxError, ...)
        raise DatasetError(source, f"corrupt or truncated image: {type(err).__name__}: {err}") from None
    if rgb.width == 0 or rgb.height == 0:
        raise DatasetError(source, "not an image: zero width or height")
    return rgb


def load_image(path: Path | str, max_pixels: int | None = None, formats: Sequence[str] = ALL_FORMATS) -> Image.Image:
    """Read an image file into a fully loaded RGB PIL image (`DatasetError` naming it on failure)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DatasetError(path, f"cannot read: {err.strerror or err}") from None
    return decode_image(data, path, max_pixels, formats)
