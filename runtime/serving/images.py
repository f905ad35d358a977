"""Images in and out of the API: `data:` URLs (size-checked before decoding) and base64 PNGs."""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from PIL import Image

from .errors import APIError, bad_request

_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.ASCII)


def decode_data_url(url: str, param: str, max_bytes: int, max_pixels: int) -> Image.Image:
    """An RGB image from a base64 `data:` URL; the server fetches nothing, so remote URLs are refused."""
    if re.match(r"(?i)https?://", url):
        raise bad_request(param, "remote image URLs are not fetched by this server; send the image inline as a "
                                 "data:image/png;base64,... URL")
    head = _DATA_URL.match(url)
    if head is None or not head.group("b64"):
        raise bad_request(param, "expected a base64 data: URL (data:image/png;base64,...)")
    payload = url[head.end():]
    # base64 is 4 characters per 3 bytes: refuse an oversized image before decoding any of it.
    if len(payload) * 3 // 4 > max_bytes:
        raise APIError(413, f"{param}: the image is larger than {max_bytes} bytes", param=param, code="image_too_large")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(param, "the data: URL is not valid base64") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as img:
                if img.width * img.height > max_pixels:
                    raise APIError(413, f"{param}: the image has {img.width}x{img.height} pixels, at most {max_pixels} "
                                        "are accepted", param=param, code="image_too_large")
                return img.convert("RGB")
    except (OSError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # UnidentifiedImageError is an OSError
        raise bad_request(param, f"not a readable image ({e})") from None


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
