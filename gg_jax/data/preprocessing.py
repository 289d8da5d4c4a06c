"""Per-example image preprocessing in NumPy and PIL: the reference's torchvision transforms.

Every transform takes one image, either encoded bytes (JPEG, PNG, GIF, BMP) or
decoded pixels (`uint8 [H, W]`, `[H, W, 1|3|4]`), and returns `uint8` pixels;
normalisation (`normalize`) comes later, on whole batches (on the accelerator in
`create_train_iterator` / `create_eval_iterator`). Randomness comes from a NumPy
`Generator` the caller seeds per example, so an example's augmentation depends
only on its seed, never on thread timing or on what ran before it.

Decoding: JPEGs (YCbCr or grey) with libjpeg-turbo through `simplejpeg`, other
files and colour spaces (CMYK) with PIL, always to RGB. Evaluation decodes exactly
as PIL does (the same pixels as torchvision's `default_loader`); training uses
libjpeg-turbo's fast IDCT and upsampling, and decodes at 1/2, 1/4 or 1/8 scale
(DCT-domain downscaling) when the crop still has at least the output's resolution
at that scale.

Train, `inception_crop` (the reference's `RandomResizedCrop(224)` +
`RandomHorizontalFlip()`): `random_resized_crop_params` is torchvision's
`RandomResizedCrop.get_params` (10 attempts of an area share uniform in [0.08, 1]
and a log-uniform aspect ratio in [3/4, 4/3], w = round(sqrt(area * ratio)),
h = round(sqrt(area / ratio)); then the whole image with its aspect ratio clamped
to that range, centred); the window is resized to 224 x 224 with PIL's bilinear
filter (antialiased when shrinking, as torchvision on PIL images), then flipped
with probability 1/2.

Train, `scale_aug` (the paper): the shorter side resized to an integer uniform in
[256, 512] (times image_size / 224), a uniform random 224 x 224 window, a flip
with probability 1/2, and AlexNet's PCA lighting noise (standard deviation 0.1,
fb.resnet.torch's ImageNet eigenvalues and eigenvectors), returned as a per-image
RGB offset that `normalize` adds.

Train, `center_crop_flip` / `square_center_crop_flip` (fast-MPN-COV's fine-grained
recipes): `Resize(s)` or `Resize((s, s))`, `CenterCrop(image_size)`, flip.

Eval: `Resize(256)` (shorter side 256, longer `int(256 * long / short)`, PIL
bilinear with antialiasing) then `CenterCrop(224)` (offsets
`int(round((h - 224) / 2))`), or `TenCrop(224)` (top-left, top-right, bottom-left,
bottom-right, centre, then the same of the mirrored image), or the centre crop and
its mirror.

Crops of a resized image are computed directly: PIL resizes only the crop's
preimage (`Image.resize(..., box=...)`) with the filter scale of the whole resize,
which is the same computation up to rounding (at most 1 grey level).

Normalisation: pixels / 255, minus mean (0.485, 0.456, 0.406), divided by
std (0.229, 0.224, 0.225), per RGB channel.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

try:  # libjpeg-turbo; PIL decodes everything without it, only slower.
    import simplejpeg
except ImportError:  # pragma: no cover - a train dependency
    simplejpeg = None

MEAN_RGB = (0.485, 0.456, 0.406)
STDDEV_RGB = (0.229, 0.224, 0.225)

# AlexNet-style PCA lighting noise, ImageNet statistics (fb.resnet.torch).
PCA_STD = 0.1
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)

AREA_RANGE = (0.08, 1.0)
ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
MAX_ATTEMPTS = 10
# Eval resizes the shorter side to 256 and crops 224: the crop covers 224/256 of it.
DEFAULT_RESIZE_SIZE = 256
DEFAULT_IMAGE_SIZE = 224
RESIZE_MODES = ("shorter", "square")
# JPEG DCT-domain scales libjpeg decodes fastest (1/k of each side).
_JPEG_REDUCTIONS = (8, 4, 2)
_JPEG_COLORSPACES = ("YCbCr", "Gray")


class UndecodableImageError(ValueError):
    """The bytes are not an image any decoder reads (the pipeline names the example)."""


# ----------------------------------------------------------------------- decoding


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


# --------------------------------------------------------------- torchvision geometry


def random_resized_crop_params(
    rng: np.random.Generator,
    height: int,
    width: int,
    *,
    scale: tuple[float, float] = AREA_RANGE,
    ratio: tuple[float, float] = ASPECT_RATIO_RANGE,
    attempts: int = MAX_ATTEMPTS,
) -> tuple[int, int, int, int]:
    """torchvision `RandomResizedCrop.get_params`: the window (top, left, height, width)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback: the whole image, its aspect ratio clamped to the range, centred.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_shape(height: int, width: int, size: int, mode: str = "shorter") -> tuple[int, int]:
    """torchvision `Resize(size)` ("shorter": shorter side -> size, longer ->
    int(size * long / short)) or `Resize((size, size))` ("square")."""
    if mode == "square":
        return size, size
    if mode != "shorter":
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, not {mode!r}")
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def center_crop_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision `CenterCrop(size)`: (top, left) = int(round((h - size) / 2)), ...(half to even)."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def _resized_crop(image, resize: tuple[int, int], top: int, left: int, size: int, *, fast: bool) -> np.ndarray:
    """Crop [top, top + size) x [left, left + size) of the image resized to `resize` = (h, w)."""
    height, width = image_shape(image)
    fy, fx = height / resize[0], width / resize[1]
    box = (left * fx, top * fy, (left + size) * fx, (top + size) * fy)
    return resize_box(image, box, (size, size), fast=fast)


def _check_sizes(image_size: int, resize_size: int):
    if image_size > resize_size:
        raise ValueError(f"image_size {image_size} must not exceed resize_size {resize_size}")


def _maybe_flip(pixels: np.ndarray, rng: np.random.Generator, flip: bool) -> np.ndarray:
    return pixels[:, ::-1] if flip and rng.random() < 0.5 else pixels


# ------------------------------------------------------------------------ train


def inception_crop(image, rng: np.random.Generator, *, image_size: int = DEFAULT_IMAGE_SIZE, flip: bool = True):
    """Random-resized crop + optional horizontal flip: uint8 [image_size, image_size, 3]."""
    height, width = image_shape(image)
    top, left, h, w = random_resized_crop_params(rng, height, width)
    out = resize_box(image, (left, top, left + w, top + h), (image_size, image_size), fast=True)
    return _maybe_flip(out, rng, flip)


def pca_lighting_shift(rng: np.random.Generator, std: float = PCA_STD) -> np.ndarray:
    """AlexNet lighting noise as an RGB offset in pixel units: 255 * eigvec @ (alpha * eigval), alpha ~ N(0, std)."""
    alpha = rng.normal(0.0, std, 3)
    return (255.0 * np.asarray(PCA_EIGVEC) @ (alpha * np.asarray(PCA_EIGVAL))).astype(np.float32)


def scale_aug(
    image,
    rng: np.random.Generator,
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    scale_range: tuple[int, int] | None = None,
    flip: bool = True,
    lighting_std: float = PCA_STD,
):
    """The paper's scale augmentation: (uint8 [S, S, 3], RGB offset float32 [3] of the lighting noise)."""
    if scale_range is None:
        scale_range = (
            round(256 * image_size / DEFAULT_IMAGE_SIZE),
            round(512 * image_size / DEFAULT_IMAGE_SIZE),
        )
    height, width = image_shape(image)
    short = int(rng.integers(scale_range[0], scale_range[1] + 1))
    new_h, new_w = resized_shape(height, width, short)
    if min(new_h, new_w) < image_size:
        raise ValueError(f"scale_range {scale_range} must not go below image_size {image_size}")
    top = int(rng.integers(0, new_h - image_size + 1))
    left = int(rng.integers(0, new_w - image_size + 1))
    out = _maybe_flip(_resized_crop(image, (new_h, new_w), top, left, image_size, fast=True), rng, flip)
    shift = pca_lighting_shift(rng, lighting_std) if lighting_std else np.zeros(3, np.float32)
    return out, shift


def center_crop_flip(
    image,
    rng: np.random.Generator,
    *,
    image_size: int,
    resize_size: int,
    resize_mode: str = "shorter",
    flip: bool = True,
):
    """`Resize(s)` / `Resize((s, s))`, `CenterCrop(image_size)`, `RandomHorizontalFlip()`: uint8 [S, S, 3]."""
    _check_sizes(image_size, resize_size)
    height, width = image_shape(image)
    new_h, new_w = resized_shape(height, width, resize_size, resize_mode)
    top, left = center_crop_offsets(new_h, new_w, image_size)
    return _maybe_flip(_resized_crop(image, (new_h, new_w), top, left, image_size, fast=True), rng, flip)


def translate(image, rng: np.random.Generator, *, image_size: int, max_shift: int):
    """Resize to image_size (bilinear), then shift by up to max_shift pixels (zero fill): uint8."""
    out = resize_whole(image, image_size)
    if max_shift > 0:
        padded = np.pad(out, [(max_shift, max_shift), (max_shift, max_shift), (0, 0)])
        dy, dx = rng.integers(0, 2 * max_shift + 1, 2)
        out = padded[dy : dy + image_size, dx : dx + image_size]
    return out


# ------------------------------------------------------------------------- eval


def resize_whole(image, image_size: int) -> np.ndarray:
    """The whole image resized to image_size x image_size (bilinear): uint8 (the digits' eval)."""
    height, width = image_shape(image)
    return resize_box(image, (0, 0, width, height), (image_size, image_size))


def eval_crop(
    image,
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    resize_size: int = DEFAULT_RESIZE_SIZE,
    resize_mode: str = "shorter",
    crops: str = "center",
) -> np.ndarray:
    """torchvision `Resize(resize_size)` (or `Resize((s, s))` with resize_mode "square"), then
    `CenterCrop` uint8 [S, S, 3] (crops "center"), `TenCrop` [10, S, S, 3] ("ten") or the
    centre crop and its mirror [2, S, S, 3] ("mirror")."""
    _check_sizes(image_size, resize_size)
    height, width = image_shape(image)
    new_h, new_w = resized_shape(height, width, resize_size, resize_mode)
    if crops in ("center", "mirror"):
        top, left = center_crop_offsets(new_h, new_w, image_size)
        crop = _resized_crop(image, (new_h, new_w), top, left, image_size, fast=False)
        return crop if crops == "center" else np.stack([crop, crop[:, ::-1]])
    if crops != "ten":
        raise ValueError(f"crops must be 'center', 'ten' or 'mirror', not {crops!r}")
    resized = resize_box(image, (0, 0, width, height), (new_h, new_w))
    s = image_size
    corners = [(0, 0), (0, new_w - s), (new_h - s, 0), (new_h - s, new_w - s), center_crop_offsets(new_h, new_w, s)]
    five = [resized[y : y + s, x : x + s] for y, x in corners]
    mirrored = resized[:, ::-1]
    five_mirrored = [mirrored[y : y + s, x : x + s] for y, x in corners]
    return np.stack(five + five_mirrored)


def normalize(images, dtype=np.float32, shift=None) -> np.ndarray:
    """((pixels + shift) / 255 - mean) / std per RGB channel; uint8/float [..., 3] in, `dtype` out.

    shift: per-image RGB offsets [B, 3] in pixel units (the lighting noise of `scale_aug`), or None.
    """
    mean = np.asarray([255.0 * m for m in MEAN_RGB], np.float32)
    inv_std = np.asarray([1.0 / (255.0 * s) for s in STDDEV_RGB], np.float32)
    out = np.asarray(images, np.float32)
    if shift is not None:
        shift = np.asarray(shift, np.float32)
        out = out + shift.reshape(shift.shape[:1] + (1,) * (out.ndim - 2) + (3,))
    return ((out - mean) * inv_std).astype(dtype)


def eval_image(
    image,
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    resize_size: int | None = None,
    resize_mode: str = "shorter",
) -> np.ndarray:
    """One image (a file path, encoded bytes or uint8 pixels) as the eval pipeline makes it:
    resize, centre crop, normalise; float32 [S, S, 3]. resize_size defaults to S * 256 / 224."""
    resize_size = resize_size or round(image_size * DEFAULT_RESIZE_SIZE / DEFAULT_IMAGE_SIZE)
    pixels = eval_crop(read_image(image), image_size=image_size, resize_size=resize_size, resize_mode=resize_mode)
    return normalize(pixels)


# ---------------------------------------------------------------- augmentations


@dataclasses.dataclass(frozen=True)
class AugmentContext:
    """What an augmentation is built for: output size, the resize of centre-crop recipes,
    whether flips keep the label, and the dataset's evaluation transform ('crop' | 'resize')."""

    image_size: int
    resize_size: int | None = None
    flip: bool = True
    eval_mode: str = "crop"


# An augmentation maps (image, rng) to {'image': uint8 [S, S, 3]} (+ 'pixel_shift': float32 [3]).
Augment = Callable[[Any, np.random.Generator], dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Augmentation:
    name: str
    build: Callable[[AugmentContext], Augment]
    doc: str


AUGMENTATIONS: dict[str, Augmentation] = {}


def register_augmentation(name: str, doc: str):
    """Registers `build(context) -> augment` under `name` (the config's `dataset.augment`)."""

    def wrap(build):
        if name in AUGMENTATIONS:
            raise ValueError(f"augmentation {name!r} is registered twice")
        AUGMENTATIONS[name] = Augmentation(name, build, doc)
        return build

    return wrap


def get_augmentation(name: str, context: AugmentContext) -> Augment:
    if name not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)} (or None), not {name!r}")
    return AUGMENTATIONS[name].build(context)


@dataclasses.dataclass(frozen=True)
class ImageTransform:
    """`fn(image, rng, **kwargs)` (or `fn(image, **kwargs)`) as an augmentation: {'image': pixels}.

    A frozen dataclass of a module-level function, so it pickles into the worker processes.
    """

    fn: Callable[..., np.ndarray]
    kwargs: tuple[tuple[str, Any], ...]
    uses_rng: bool = True

    def __call__(self, image, rng):
        kwargs = dict(self.kwargs)
        return {"image": self.fn(image, rng, **kwargs) if self.uses_rng else self.fn(image, **kwargs)}


@dataclasses.dataclass(frozen=True)
class ImageShiftTransform:
    """`fn(image, rng, **kwargs) -> (pixels, RGB offset)` as an augmentation (`scale_aug`'s lighting)."""

    fn: Callable[..., tuple[np.ndarray, np.ndarray]]
    kwargs: tuple[tuple[str, Any], ...]

    def __call__(self, image, rng):
        pixels, shift = self.fn(image, rng, **dict(self.kwargs))
        return {"image": pixels, "pixel_shift": shift}


def frozen_kwargs(**kwargs) -> tuple[tuple[str, Any], ...]:
    """Keyword arguments as a hashable, picklable tuple (for `ImageTransform`)."""
    return tuple(sorted(kwargs.items()))


@register_augmentation("inception_crop", "random-resized crop (8%-100% area, ratio 3/4-4/3) + flip (the reference)")
def _inception_crop(c: AugmentContext) -> Augment:
    return ImageTransform(inception_crop, frozen_kwargs(image_size=c.image_size, flip=c.flip))


@register_augmentation("scale_aug", "shorter side uniform in [256, 512], random crop, flip, PCA lighting (the paper)")
def _scale_aug(c: AugmentContext) -> Augment:
    return ImageShiftTransform(scale_aug, frozen_kwargs(image_size=c.image_size, flip=c.flip))


@register_augmentation("translate", "resize, random shift of up to 1/8 of the side, no flip (the digits default)")
def _translate(c: AugmentContext) -> Augment:
    return ImageTransform(translate, frozen_kwargs(image_size=c.image_size, max_shift=max(1, round(c.image_size / 8))))


@register_augmentation("center_crop_flip", "shorter side to train_resize_size, centre crop, flip (CUB)")
def _center_crop_flip(c: AugmentContext) -> Augment:
    size = c.resize_size or c.image_size
    return ImageTransform(
        center_crop_flip, frozen_kwargs(image_size=c.image_size, resize_size=size, resize_mode="shorter", flip=c.flip)
    )


@register_augmentation("square_center_crop_flip", "both sides to train_resize_size, centre crop, flip (Cars, Aircraft)")
def _square_center_crop_flip(c: AugmentContext) -> Augment:
    size = c.resize_size or c.image_size
    return ImageTransform(
        center_crop_flip, frozen_kwargs(image_size=c.image_size, resize_size=size, resize_mode="square", flip=c.flip)
    )


@register_augmentation("none", "the evaluation transform (no randomness)")
def _none(c: AugmentContext) -> Augment:
    if c.eval_mode == "resize":
        return ImageTransform(resize_whole, frozen_kwargs(image_size=c.image_size), uses_rng=False)
    resize = max(c.image_size, round(c.image_size * DEFAULT_RESIZE_SIZE / DEFAULT_IMAGE_SIZE))
    return ImageTransform(eval_crop, frozen_kwargs(image_size=c.image_size, resize_size=resize), uses_rng=False)
