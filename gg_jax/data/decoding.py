"""Image decoding in PIL and libjpeg-turbo: encoded bytes or pixels in, RGB pixels out.

`image_shape` reads a size from the header only; `decode` gives an RGB PIL image
(JPEGs, YCbCr or grey, with libjpeg-turbo through `simplejpeg`; other files and
colour spaces, CMYK, with PIL); `resize_box` resizes a window of an image with PIL's
bilinear filter. Evaluation decodes exactly as PIL does (the same pixels as
torchvision's `default_loader`); training uses libjpeg-turbo's fast IDCT and
upsampling, and decodes at 1/2, 1/4 or 1/8 scale (DCT-domain downscaling) when the
crop still has at least the output's resolution at that scale. Bytes no decoder
reads raise `UndecodableImageError`.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

try:  # libjpeg-turbo; PIL decodes everything without it, only slower.
    import simplejpeg
except ImportError:  # pragma: no cover - a train dependency
    simplejpeg = None

# JPEG DCT-domain scales libjpeg decodes fastest (1/k of each side).
_JPEG_REDUCTIONS = (8, 4, 2)
_JPEG_COLORSPACES = ("YCbCr", "Gray")


class UndecodableImageError(ValueError):
    """The bytes are not an image any decoder reads (the pipeline names the example)."""


def is_jpeg(data) -> bool:
    return isinstance(data, bytes | bytearray | memoryview) and bytes(data[:3]) == b"\xff\xd8\xff"


def _rgb_array(pixels: np.ndarray) -> np.ndarray:
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        raise ValueError(f"decoded images must be uint8, not {pixels.dtype}")
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.ndim != 3 or pixels.shape[-1] not in (1, 3, 4):
        raise ValueError(f"decoded images must be [H, W] or [H, W, 1|3|4], not {pixels.shape}")
    if pixels.shape[-1] == 1:
        return np.repeat(pixels, 3, axis=-1)
    return pixels[:, :, :3]


def _jpeg_header(data) -> tuple[int, int, str] | None:
    """(height, width, colour space) of a JPEG libjpeg-turbo decodes to RGB, else None."""
    if simplejpeg is None or not is_jpeg(data):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError as e:
        raise UndecodableImageError(f"not a readable JPEG ({e})") from None
    return (height, width, colorspace) if colorspace in _JPEG_COLORSPACES else None


def _open_pil(data) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UndecodableImageError(str(e) or type(e).__name__) from None


def _pil_rgb(image: Image.Image, reduce: int = 1) -> Image.Image:
    try:
        if reduce > 1 and image.format == "JPEG":
            image.draft("RGB", (-(-image.width // reduce), -(-image.height // reduce)))
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UndecodableImageError(str(e) or type(e).__name__) from None


def image_shape(image) -> tuple[int, int]:
    """(height, width) of encoded bytes (from the header only) or of pixels."""
    if isinstance(image, np.ndarray):
        return int(image.shape[0]), int(image.shape[1])
    header = _jpeg_header(image)
    if header is not None:
        return header[0], header[1]
    pil = _open_pil(image)
    return pil.height, pil.width


def decode(image, *, reduce: int = 1, fast: bool = False) -> Image.Image:
    """RGB PIL image of encoded bytes or pixels; JPEGs at 1/`reduce` scale (1, 2, 4 or 8).

    `fast`: libjpeg-turbo's fast integer IDCT and plain chroma upsampling (training);
    otherwise the pixels are exactly PIL's. The image's size tells the scale reached.
    """
    if isinstance(image, np.ndarray):
        return Image.fromarray(np.ascontiguousarray(_rgb_array(image)))
    header = _jpeg_header(image)
    if header is not None:
        height, width, _ = header
        kwargs = {}
        if reduce > 1:
            kwargs = {"min_height": -(-height // reduce), "min_width": -(-width // reduce)}
        try:
            rgbx = simplejpeg.decode_jpeg(image, colorspace="RGBX", fastdct=fast, fastupsample=fast, **kwargs)
        except ValueError as e:
            raise UndecodableImageError(f"corrupt JPEG data ({e})") from None
        # PIL keeps RGB as 4 bytes a pixel: RGBX pixels are used in place, not copied.
        return Image.frombuffer("RGBX", (rgbx.shape[1], rgbx.shape[0]), rgbx, "raw", "RGBX", 0, 1)
    return _pil_rgb(_open_pil(image), reduce)


def to_array(image: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3] pixels of an RGB or RGBX PIL image."""
    pixels = np.asarray(image)
    return pixels[:, :, :3] if pixels.shape[-1] == 4 else pixels


def read_image(image) -> bytes | np.ndarray:
    """Bytes of a file path (str or os.PathLike); bytes and arrays unchanged."""
    if isinstance(image, str | os.PathLike):
        with open(image, "rb") as f:
            return f.read()
    if isinstance(image, bytearray | memoryview):
        return bytes(image)
    return image


def _reduction(height: int, width: int, box_h: float, box_w: float, out_h: int, out_w: int) -> int:
    """Largest JPEG scale-down 1/k at which the box keeps at least the output's resolution."""
    for k in _JPEG_REDUCTIONS:
        if box_h / k >= out_h and box_w / k >= out_w and height >= 8 * k and width >= 8 * k:
            return k
    return 1


def resize_box(
    image,
    box: tuple[float, float, float, float],
    size: tuple[int, int],
    *,
    fast: bool = False,
) -> np.ndarray:
    """The window `box` = (left, top, right, bottom) of the image, in the image's pixel
    coordinates, resized to `size` = (height, width) with PIL's bilinear filter
    (antialiased when shrinking, as torchvision on PIL images): uint8 [h, w, 3].

    JPEGs are decoded at the smallest DCT scale that keeps the window's resolution
    at least `size` when `fast` (training); otherwise in full.
    """
    height, width = image_shape(image)
    left, top, right, bottom = box
    reduce = _reduction(height, width, bottom - top, right - left, size[0], size[1]) if fast else 1
    pil = decode(image, reduce=reduce, fast=fast)
    sx, sy = pil.width / width, pil.height / height
    scaled = (left * sx, top * sy, right * sx, bottom * sy)
    if size == (pil.height, pil.width) and scaled == (0, 0, pil.width, pil.height):
        return to_array(pil)
    return to_array(pil.resize((size[1], size[0]), Image.BILINEAR, box=scaled))
