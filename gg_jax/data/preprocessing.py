"""Per-example image preprocessing in NumPy and PIL: the reference's torchvision transforms.

Every transform takes one image, either encoded bytes (JPEG, PNG, GIF, BMP) or
decoded pixels (`uint8 [H, W]`, `[H, W, 1|3|4]`), and returns `uint8` pixels;
normalisation (`normalize`) comes later, on whole batches (on the accelerator in
`create_train_iterator` / `create_eval_iterator`). Randomness comes from a NumPy
`Generator` the caller seeds per example, so an example's augmentation depends
only on its seed, never on thread timing or on what ran before it. Decoding is
`decoding`'s; the registry of train transforms by name is `augmentations`.

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

import math

import numpy as np

from gg_jax.data.decoding import image_shape, read_image, resize_box

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
    `CenterCrop` uint8 [S, S, 3] (crops "center"), `TenCrop` [10, S, S, 3] ("ten"), or
    fast-MPN-COV's `CenterCropWithFlip` [2, S, S, 3] ("mirror"): the centre crop, and the centre
    crop of the mirrored image (not the mirror of the first when the width left over is odd:
    the centre crop's offset is rounded)."""
    _check_sizes(image_size, resize_size)
    height, width = image_shape(image)
    new_h, new_w = resized_shape(height, width, resize_size, resize_mode)
    if crops in ("center", "mirror"):
        top, left = center_crop_offsets(new_h, new_w, image_size)
        crop = _resized_crop(image, (new_h, new_w), top, left, image_size, fast=False)
        if crops == "center":
            return crop
        # The columns the centre crop of the mirrored image takes, in the image's own order.
        mirrored = _resized_crop(image, (new_h, new_w), top, new_w - left - image_size, image_size, fast=False)
        return np.stack([crop, mirrored[:, ::-1]])
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
