"""Per-example image preprocessing in TensorFlow (runs inside tf.data, on the CPU).

Every function takes one image, either encoded bytes (a scalar `tf.string`: JPEG,
PNG, GIF or BMP) or decoded pixels (`uint8 [H, W, 3]`), and returns float32
pixels in [0, 255]; `normalize` turns a batch of those into model inputs.

Randomness is stateless: each function takes a `key` (`int64 [2]`), so the
augmentation of an example depends only on its key, never on thread timing or
on how many examples came before it.

Train, `inception_crop` (the reference training scripts; torchvision's
`RandomResizedCrop(224)` + `RandomHorizontalFlip`): a window of 8%-100% of the
image area with aspect ratio in [3/4, 4/3] is sampled with
`tf.image.stateless_sample_distorted_bounding_box` (10 attempts); if every attempt
fails the centre square of 224/256 of the shorter side is used instead (as the
Flax ImageNet example does). Only that window of a JPEG is decoded
(`tf.image.decode_and_crop_jpeg`). It is resized to 224x224 with bilinear
interpolation (no antialiasing: the crop is rarely more than 2x larger than the
output, and antialiasing halves the throughput), then flipped with probability 1/2.

Train, `scale_aug` (the paper): the shorter side is resized to an integer drawn
uniformly from [256, 512] (scaled by image_size / 224 for other sizes), a random
224x224 window is cropped, flipped with probability 1/2, and AlexNet's PCA
lighting noise (standard deviation 0.1, the ImageNet eigenvalues/eigenvectors of
fb.resnet.torch) is added.

Eval: the shorter side is resized to 256 (bilinear with antialiasing, like
PIL/torchvision `Resize(256)`; the longer side is `int(256 * long / short)` as in
torchvision), then the centre 224x224 crop is taken (`CenterCrop(224)`), or the
ten crops of torchvision's `TenCrop(224)`: top-left, top-right, bottom-left,
bottom-right and centre, then the same five crops of the horizontally flipped
image.

Normalisation: pixels / 255, minus mean (0.485, 0.456, 0.406), divided by
std (0.229, 0.224, 0.225), per RGB channel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from gg_jax.data._tf import tf as _tf

if TYPE_CHECKING:
    import tensorflow as tf

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


def split_key(key, num: int):
    """Splits an int64 [2] key into `num` independent int64 [2] keys."""
    tf = _tf()
    keys = tf.random.experimental.stateless_split(tf.cast(key, tf.int64), num=num)
    return [keys[i] for i in range(num)]


def _as_rgb(image):
    tf = _tf()
    image = tf.convert_to_tensor(image)
    if image.shape.rank == 2:
        image = image[:, :, None]
    channels = image.shape[-1]
    if channels == 1:
        image = tf.image.grayscale_to_rgb(image)
    elif channels == 4:
        image = image[:, :, :3]
    image = tf.ensure_shape(image, [None, None, 3])
    return image


def decode_full(image):
    """Decodes encoded bytes (any format TensorFlow reads) to uint8 [H, W, 3]."""
    tf = _tf()
    if image.dtype == tf.string:
        image = tf.io.decode_image(image, channels=3, expand_animations=False)
    return _as_rgb(image)


def decode_window(image, window_fn: Callable[[tf.Tensor], tf.Tensor]):
    """Decodes the window `window_fn((h, w))` of the image, uint8 [h', w', 3].

    `window_fn` maps the image's (height, width) to an int32 window
    (offset_y, offset_x, height, width).

    For JPEGs only the header and the window are decoded
    (`tf.image.decode_and_crop_jpeg`); other formats are decoded whole and sliced.
    """
    tf = _tf()

    def crop_decoded(decoded):
        window = window_fn(tf.shape(decoded)[:2])
        return tf.slice(decoded, [window[0], window[1], 0], [window[2], window[3], 3])

    if image.dtype != tf.string:
        return crop_decoded(_as_rgb(image))

    def jpeg():
        window = window_fn(tf.image.extract_jpeg_shape(image)[:2])
        return tf.image.decode_and_crop_jpeg(image, window, channels=3)

    def other():
        return crop_decoded(decode_full(image))

    return tf.ensure_shape(tf.cond(tf.io.is_jpeg(image), jpeg, other), [None, None, 3])


def center_square_window(shape, fraction: float):
    """Centre square of `fraction` of the shorter side (the Flax example's fallback)."""
    tf = _tf()
    shape = tf.cast(shape, tf.int32)
    h, w = shape[0], shape[1]
    size = tf.cast(fraction * tf.cast(tf.minimum(h, w), tf.float32), tf.int32)
    size = tf.maximum(size, 1)
    return tf.stack([(h - size + 1) // 2, (w - size + 1) // 2, size, size])


def random_resized_crop_window(
    shape,
    key,
    *,
    area_range: Sequence[float] = AREA_RANGE,
    aspect_ratio_range: Sequence[float] = ASPECT_RATIO_RANGE,
    max_attempts: int = MAX_ATTEMPTS,
    fallback_fraction: float = DEFAULT_IMAGE_SIZE / DEFAULT_RESIZE_SIZE,
):
    """The inception-crop window (offset_y, offset_x, height, width) for an image of `shape`."""
    tf = _tf()
    shape = tf.cast(shape, tf.int32)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.concat([shape, [3]], axis=0),
        bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
        seed=key,
        min_object_covered=area_range[0],
        aspect_ratio_range=aspect_ratio_range,
        area_range=area_range,
        max_attempts=max_attempts,
        use_image_if_no_bounding_boxes=True,
    )
    sampled = tf.stack([begin[0], begin[1], size[0], size[1]])
    # When every attempt fails the op returns the whole image.
    failed = tf.logical_and(tf.equal(size[0], shape[0]), tf.equal(size[1], shape[1]))
    return tf.where(failed, center_square_window(shape, fallback_fraction), sampled)


def resize(image, size):
    """Bilinear resize (no antialiasing) of uint8/float [H, W, 3] to `size`, float32."""
    tf = _tf()
    return tf.image.resize(image, size, method="bilinear", antialias=False)


def inception_crop(image, key, *, image_size: int = DEFAULT_IMAGE_SIZE, flip: bool = True):
    """Random-resized crop + optional horizontal flip, float32 [image_size, image_size, 3]."""
    tf = _tf()
    crop_key, flip_key = split_key(key, 2)
    crop = decode_window(image, lambda shape: random_resized_crop_window(shape, crop_key))
    out = resize(crop, [image_size, image_size])
    if flip:
        out = tf.image.stateless_random_flip_left_right(out, flip_key)
    return tf.ensure_shape(out, [image_size, image_size, 3])


def resized_shorter_side_shape(shape, size):
    """torchvision `Resize(size)`: shorter side -> size, longer -> int(size * long / short)."""
    tf = _tf()
    shape = tf.cast(shape, tf.float64)
    h, w = shape[0], shape[1]
    size = tf.cast(size, tf.float64)
    short = tf.minimum(h, w)
    new_h = tf.where(h <= w, size, tf.floor(size * h / short))
    new_w = tf.where(h <= w, tf.floor(size * w / short), size)
    return tf.cast(tf.stack([new_h, new_w]), tf.int32)


def resize_shorter_side(image, size, *, antialias: bool = True):
    """Resizes so that the shorter side is `size` (as torchvision `Resize(size)`), float32."""
    tf = _tf()
    image = _as_rgb(image)
    new_shape = resized_shorter_side_shape(tf.shape(image)[:2], size)
    same = tf.reduce_all(tf.equal(new_shape, tf.shape(image)[:2]))
    return tf.cond(
        same,
        lambda: tf.cast(image, tf.float32),
        lambda: tf.image.resize(image, new_shape, method="bilinear", antialias=antialias),
    )


def resize_square(image, size, *, antialias: bool = True):
    """Resizes both sides to `size`, ignoring the aspect ratio (torchvision `Resize((size, size))`), float32."""
    tf = _tf()
    return tf.image.resize(_as_rgb(image), [size, size], method="bilinear", antialias=antialias)


def _resize(image, size, mode: str):
    if mode == "shorter":
        return resize_shorter_side(image, size)
    if mode == "square":
        return resize_square(image, size)
    raise ValueError(f"resize mode must be 'shorter' or 'square', not {mode!r}")


def center_crop_flip(image, key, *, image_size: int, resize_size: int, resize_mode: str = "shorter", flip: bool = True):
    """Resize, centre crop, random horizontal flip: fast-MPN-COV's fine-grained training.

    `resize_mode` "shorter": shorter side to `resize_size` (torchvision `Resize(s)`, CUB);
    "square": both sides (`Resize((s, s))`, FGVC-Aircraft 512, Stanford Cars 448); then
    `CenterCrop(image_size)` and `RandomHorizontalFlip()`. float32 [image_size, image_size, 3].
    """
    tf = _tf()
    if image_size > resize_size:
        raise ValueError(f"image_size {image_size} must not exceed resize_size {resize_size}")
    out = center_crop(_resize(decode_full(image), resize_size, resize_mode), image_size)
    if flip:
        out = tf.image.stateless_random_flip_left_right(out, key)
    return tf.ensure_shape(out, [image_size, image_size, 3])


def scale_aug(
    image,
    key,
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    scale_range: Sequence[int] | None = None,
    flip: bool = True,
    lighting_std: float = PCA_STD,
):
    """The paper's scale augmentation + PCA lighting, float32 [image_size, image_size, 3]."""
    tf = _tf()
    if scale_range is None:
        scale_range = (
            round(256 * image_size / DEFAULT_IMAGE_SIZE),
            round(512 * image_size / DEFAULT_IMAGE_SIZE),
        )
    scale_key, crop_key, flip_key, light_key = split_key(key, 4)
    short = tf.random.stateless_uniform([], scale_key, minval=scale_range[0], maxval=scale_range[1] + 1, dtype=tf.int32)
    decoded = decode_full(image)
    new_shape = resized_shorter_side_shape(tf.shape(decoded)[:2], short)
    out = tf.image.resize(decoded, new_shape, method="bilinear", antialias=False)
    out = tf.image.stateless_random_crop(out, [image_size, image_size, 3], crop_key)
    if flip:
        out = tf.image.stateless_random_flip_left_right(out, flip_key)
    if lighting_std:
        out = pca_lighting(out, light_key, std=lighting_std)
    return tf.ensure_shape(out, [image_size, image_size, 3])


def pca_lighting(image, key, *, std: float = PCA_STD):
    """AlexNet lighting noise on float [0, 255] pixels: + eigvec @ (alpha * eigval), alpha ~ N(0, std)."""
    tf = _tf()
    alpha = tf.random.stateless_normal([3], key, stddev=std)
    rgb = tf.linalg.matvec(tf.constant(PCA_EIGVEC), alpha * tf.constant(PCA_EIGVAL))
    return image + 255.0 * rgb


def translate(image, key, *, image_size: int, max_shift: int):
    """Resize to image_size, then shift by up to max_shift pixels (zero fill), float32."""
    tf = _tf()
    out = resize(decode_full(image), [image_size, image_size])
    if max_shift > 0:
        out = tf.pad(out, [[max_shift, max_shift], [max_shift, max_shift], [0, 0]])
        out = tf.image.stateless_random_crop(out, [image_size, image_size, 3], key)
    return tf.ensure_shape(out, [image_size, image_size, 3])


def center_crop(image, size: int):
    """torchvision `CenterCrop(size)` of [H, W, C] (offsets rounded half to even)."""
    tf = _tf()
    shape = tf.shape(image)
    top = tf.cast(tf.round(tf.cast(shape[0] - size, tf.float32) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(shape[1] - size, tf.float32) / 2.0), tf.int32)
    return tf.slice(image, [top, left, 0], [size, size, -1])


def five_crop(image, size: int):
    """torchvision `FiveCrop(size)`: [5, size, size, C] = top-left, top-right, bottom-left, bottom-right, centre."""
    tf = _tf()
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    corners = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size)]
    crops = [tf.slice(image, [y, x, 0], [size, size, -1]) for y, x in corners]
    crops.append(center_crop(image, size))
    return tf.stack(crops)


def ten_crop(image, size: int):
    """torchvision `TenCrop(size)`: the five crops, then the five crops of the mirrored image."""
    tf = _tf()
    return tf.concat([five_crop(image, size), five_crop(tf.reverse(image, [1]), size)], 0)


def eval_preprocess(
    image,
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    resize_size: int = DEFAULT_RESIZE_SIZE,
    ten_crop_eval: bool = False,
    resize_mode: str = "shorter",
    mirror_crop: bool = False,
):
    """Resize (shorter side, or both sides with `resize_mode="square"`) to resize_size, then
    the centre crop, float32 `[S, S, 3]`; `ten_crop_eval`: torchvision's ten crops
    `[10, S, S, 3]`; `mirror_crop`: the centre crop and its mirror image `[2, S, S, 3]`
    (fast-MPN-COV's fine-grained evaluation)."""
    tf = _tf()
    if image_size > resize_size:
        raise ValueError(f"image_size {image_size} must not exceed resize_size {resize_size}")
    resized = _resize(decode_full(image), resize_size, resize_mode)
    if ten_crop_eval:
        return tf.ensure_shape(ten_crop(resized, image_size), [10, image_size, image_size, 3])
    crop = center_crop(resized, image_size)
    if mirror_crop:
        return tf.ensure_shape(tf.stack([crop, tf.reverse(crop, [1])]), [2, image_size, image_size, 3])
    return tf.ensure_shape(crop, [image_size, image_size, 3])


def eval_resize(image, *, image_size: int):
    """Whole image resized to image_size x image_size (the digits dataset's eval), float32."""
    tf = _tf()
    return tf.ensure_shape(resize(decode_full(image), [image_size, image_size]), [image_size, image_size, 3])


def normalize(images, dtype=None):
    """(pixels / 255 - mean) / std per RGB channel; float [..., 3] in, `dtype` out."""
    tf = _tf()
    dtype = tf.float32 if dtype is None else dtype
    mean = tf.constant([255.0 * m for m in MEAN_RGB], tf.float32)
    inv_std = tf.constant([1.0 / (255.0 * s) for s in STDDEV_RGB], tf.float32)
    return tf.cast((tf.cast(images, tf.float32) - mean) * inv_std, dtype)
