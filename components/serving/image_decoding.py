"""Decoding untrusted image bytes: every way they can be wrong ends in a `BadInputError` that names it.

The service (components/serving/server.py) and the registered pyfunc model (components/serving/pyfunc.py)
both take images from outside; they decode them here, so both refuse the same inputs in the same
words. Only the formats a camera or a dataset produces are opened, and the pixel count is checked
from the header before any pixel is decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import json

from PIL import Image, UnidentifiedImageError

from components.core.errors import UserError

# Formats a camera or a dataset produces. Pillow can open more (EPS shells out to Ghostscript),
# and nothing else should be reachable from untrusted bytes.
IMAGE_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "GIF", "WEBP", "PPM")


class BadInputError(UserError):
    """A request the client must fix; `kind` names the problem, `status` is the HTTP answer."""

    def __init__(self, kind: str, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes -> a fully decoded PIL image, or a `BadInputError` naming what is wrong with them.

    The pixel count is checked from the header, before any pixel is decoded, so a small file
    that expands to gigabytes (a decompression bomb) costs nothing.
    """
    if not data:
        raise BadInputError("empty_image", "the image is empty (0 bytes).")
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as error:
        raise BadInputError("too_many_pixels", f"the image is a decompression bomb: {error}") from None
    except UnidentifiedImageError:
        raise BadInputError(
            "not_an_image", f"the data ({len(data)} bytes) is not an image in a supported format {list(IMAGE_FORMATS)}."
        ) from None
    except Exception as error:  # noqa: BLE001 - any parser failure on untrusted bytes is the input's fault
        raise BadInputError("corrupt_image", f"the image header cannot be read: {error}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadInputError(
            "too_many_pixels",
            f"the image is {width}x{height} = {width * height / 1e6:.1f} megapixels, above the limit of "
            f"{max_pixels / 1e6:g} (max_image_megapixels); send a smaller image.",
        )
    try:
        image.load()
    except Exception as error:  # noqa: BLE001 - truncated or corrupt pixel data, whatever the decoder raises
        raise BadInputError("corrupt_image", f"the {image.format} image is truncated or corrupt: {error}") from None
    return image


def decode_base64(text: object, position: int) -> bytes:
    """One base64 string (optionally a `data:image/...;base64,` URL) -> bytes."""
    if not isinstance(text, str):
        raise BadInputError("bad_base64", f"images[{position}] is a {type(text).__name__}, not a base64 string.", 400)
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        # Whitespace is dropped first: `base64` and most mail-era encoders wrap lines at 76 characters.
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as error:
        raise BadInputError("bad_base64", f"images[{position}] is not valid base64: {error}", 400) from None


def json_document(body: bytes) -> dict[str, object]:
    """A JSON request body -> its top-level object."""
    try:
        document = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadInputError("bad_json", f"the body is not valid JSON: {error}", 400) from None
    if not isinstance(document, dict):
        raise BadInputError("bad_json", f"the JSON body is a {type(document).__name__}, not an object such as "
                            f'{{"images": [...]}} or {{"texts": [...]}}.', 400)
    return document


def images_from_document(document: dict[str, object]) -> list[bytes]:
    """`{"images": ["<base64>", ...]}` or `{"image": "<base64>"}` -> the decoded image bytes."""
    if isinstance(document.get("images"), list):
        items = document["images"]
    elif "image" in document:
        items = [document["image"]]
    else:
        raise BadInputError(
            "bad_json", 'the JSON body must be {"images": ["<base64>", ...]} or {"image": "<base64>"}.', 400
        )
    if not items:
        raise BadInputError("no_images", 'the JSON body has an empty "images" list.', 400)
    return [decode_base64(item, i) for i, item in enumerate(items)]  # type: ignore[union-attr] - a list

