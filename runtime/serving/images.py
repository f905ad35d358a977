"""Images in and out of the API: `data:` URLs (size-checked before decoding), and base64 PNG, JPEG or WebP."""

from __future__ import annotations

import base64
import binascii
import io
import re

from PIL import Image

from jfexport.core.processor.errors import ProcessorInputError
from jfexport.core.processor.image import check_image_size, to_rgb

from .errors import APIError, bad_request

# The formats a chat image may come in. Each states its pixel size in a header that Pillow reads
# without decoding (GIF: the first frame is the image). Containers such as ICO, TIFF or DDS can
# embed an image whose real size only shows once decoded, and every further decoder is more
# surface for a hostile file: they are refused by name rather than opened.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF")

_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.ASCII)


def _detected_format(raw: bytes) -> str:
    """What the bytes look like, for the refusal of a format not served: Pillow's check of the first
    bytes, not an attempt to open them (formats without a signature may be named wrongly or not at all)."""
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        try:
            if accept is not None and accept(raw[:16]):
                return name
        except Exception:  # an accept() that chokes on 16 bytes identifies nothing
            continue
    return "unknown"


def _too_large(param: str, message: str) -> APIError:
    return APIError(413, f"{param}: {message}", param=param, code="image_too_large")


def decode_data_url(url: str, param: str, max_bytes: int, max_pixels: int) -> Image.Image:
    """An RGB image from a base64 `data:` URL in one of FORMATS; the server fetches nothing, so remote URLs are refused.

    The pixel count is checked from the header before any pixel is decoded; every failure of the
    decoder on the bytes sent is the image's fault, so it is a 400 naming `param`, never a 500.
    """
    if re.match(r"(?i)https?://", url):
        raise bad_request(param, "remote image URLs are not fetched by this server; send the image inline as a "
                                 "data:image/png;base64,... URL")
    head = _DATA_URL.match(url)
    if head is None or not head.group("b64"):
        raise bad_request(param, "expected a base64 data: URL (data:image/png;base64,...)")
    payload = url[head.end():]
    # base64 is 4 characters per 3 bytes: refuse an oversized image before decoding any of it.
    if len(payload) * 3 // 4 > max_bytes:
        raise _too_large(param, f"the image is larger than {max_bytes} bytes")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(param, "the data: URL is not valid base64") from None
    accepted = ", ".join(FORMATS)
    Image.init()  # registers every plugin, so that a refused format is named
    try:
        img = Image.open(io.BytesIO(raw), formats=FORMATS)
    except Image.DecompressionBombError as e:
        raise _too_large(param, str(e)) from None
    except Image.UnidentifiedImageError:
        raise bad_request(param, f"the image is not in an accepted format ({accepted}); its first bytes look like "
                                 f"{_detected_format(raw)}") from None
    except Exception as e:  # a header the decoder cannot parse; whatever it raises, the bytes are at fault
        raise bad_request(param, f"not a readable image ({type(e).__name__}: {e})") from None
    with img:
        try:
            check_image_size(img, max_pixels, param)
        except ProcessorInputError as e:
            raise _too_large(param, str(e).removeprefix(f"{param}: ")) from None
        try:
            return to_rgb(img, param)
        except ProcessorInputError as e:
            raise bad_request(param, str(e).removeprefix(f"{param}: ")) from None
        except Exception as e:  # what to_rgb does not name: still the decoder failing on the bytes sent
            raise bad_request(param, f"not a readable image ({type(e).__name__}: {e})") from None


def encoded_base64(image: Image.Image, output_format: str = "png", compression: int = 100) -> str:
    """`image` as base64 `output_format` (png, jpeg or webp). `compression` is OpenAI's
    output_compression, the lossy formats' quality 0-100; WebP at 100 is lossless, so its pixels are
    the PNG's."""
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG")
    elif output_format == "jpeg":
        image.save(buffer, format="JPEG", quality=compression)
    elif output_format == "webp":
        image.save(buffer, format="WEBP", lossless=compression == 100, quality=compression)
    else:
        raise ValueError(f"unknown output format {output_format!r}")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
