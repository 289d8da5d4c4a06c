"""Geometry and value tests of the per-example preprocessing (gg_jax.data.preprocessing)."""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from gg_jax.data import preprocessing as pp  # noqa: E402
from gg_jax.data import testing  # noqa: E402


def _key(i):
    return tf.constant([i, 12345], tf.int64)


@pytest.mark.parametrize("shape", [(375, 500), (500, 375), (64, 64), (33, 300), (7, 5)])
def test_inception_crop_window_inside_image_and_within_bounds(shape):
    h_img, w_img = shape
    fallback = pp.center_square_window(tf.constant(shape), 224 / 256).numpy().tolist()
    n_fallback = 0
    areas = []
    for i in range(200):
        y, x, h, w = pp.random_resized_crop_window(tf.constant(shape), _key(i)).numpy().tolist()
        assert 0 <= y and 0 <= x and h >= 1 and w >= 1
        assert y + h <= h_img and x + w <= w_img
        if [y, x, h, w] == fallback:
            n_fallback += 1
            continue
        area = h * w / (h_img * w_img)
        areas.append(area)
        assert 0.08 - 1e-6 <= area <= 1.0 + 1e-6
        # width = round(height * aspect): the aspect ratio is exact up to half a pixel.
        assert 3 / 4 - 0.5 / h - 1e-6 <= w / h <= 4 / 3 + 0.5 / h + 1e-6
    if max(shape) / min(shape) <= 4 / 3 and min(shape) >= 64:
        assert n_fallback < 20  # Fallback only after 10 failed attempts: rare for normal images.
        assert min(areas) < 0.3 and max(areas) > 0.7  # It does sample the whole range.


@pytest.mark.parametrize("fmt", ["raw", "PNG", "JPEG"])
def test_decode_window_returns_that_window(fmt):
    image = testing.coordinate_image(200, 250)
    if fmt == "raw":
        inp = tf.constant(image)
    else:
        kwargs = {"quality": 100, "subsampling": 0} if fmt == "JPEG" else {}
        inp = tf.constant(testing.encode_image(image, fmt, **kwargs))
    tol = 6 if fmt == "JPEG" else 0  # JPEG quality 100 is still slightly lossy.
    for i in range(10):
        window = pp.random_resized_crop_window(tf.constant([200, 250]), _key(i))
        y, x, h, w = window.numpy().tolist()
        crop = pp.decode_window(inp, lambda shape, window=window: window).numpy().astype(int)
        assert crop.shape == (h, w, 3)
        assert np.abs(crop[0, 0, :2] - [y, x]).max() <= tol
        assert np.abs(crop[-1, -1, :2] - [y + h - 1, x + w - 1]).max() <= tol
        assert np.abs(crop[..., 0] - (y + np.arange(h))[:, None]).max() <= tol


def test_inception_crop_output_and_flip():
    image = tf.constant(testing.encode_image(testing.coordinate_image(120, 160), "PNG"))
    flipped = 0
    for i in range(40):
        out = pp.inception_crop(image, _key(i), image_size=32).numpy()
        assert out.shape == (32, 32, 3) and out.dtype == np.float32
        assert out.min() >= 0 and out.max() <= 255
        x_increases = out[16, -1, 1] > out[16, 0, 1]
        flipped += not x_increases
        no_flip = pp.inception_crop(image, _key(i), image_size=32, flip=False).numpy()
        assert no_flip[16, -1, 1] > no_flip[16, 0, 1]
    assert 8 <= flipped <= 32


def test_scale_aug_and_lighting():
    image = tf.constant(testing.encode_image(testing.coordinate_image(150, 200), "PNG"))
    out = pp.scale_aug(image, _key(0), image_size=64).numpy()
    assert out.shape == (64, 64, 3)
    no_light = pp.scale_aug(image, _key(0), image_size=64, lighting_std=0.0).numpy()
    shift = (out - no_light).reshape(-1, 3)
    # Lighting adds one RGB offset to every pixel.
    np.testing.assert_allclose(shift, np.broadcast_to(shift[0], shift.shape), atol=1e-3)
    assert np.abs(shift[0]).max() > 0
    # The shorter side is drawn from [256, 512] * 64 / 224 = [73, 146]: crops are 1x-2x zoomed.
    sizes = [pp.resized_shorter_side_shape([150, 200], s).numpy().tolist() for s in (73, 146)]
    assert sizes == [[73, 97], [146, 194]]


def test_resize_shorter_side_like_torchvision():
    # torchvision Resize(256): shorter side 256, longer int(256 * long / short).
    assert pp.resized_shorter_side_shape([375, 500], 256).numpy().tolist() == [256, 341]
    assert pp.resized_shorter_side_shape([500, 375], 256).numpy().tolist() == [341, 256]
    assert pp.resized_shorter_side_shape([256, 256], 256).numpy().tolist() == [256, 256]


def test_eval_center_crop_window():
    # Shorter side already 200 = resize_size: no resampling, the crop is exact.
    image = testing.coordinate_image(200, 250)
    out = pp.eval_preprocess(tf.constant(image), image_size=160, resize_size=200).numpy()
    top, left = round((200 - 160) / 2), round((250 - 160) / 2)  # 20, 45
    assert out.shape == (160, 160, 3)
    np.testing.assert_array_equal(out[..., 0], np.broadcast_to(top + np.arange(160)[:, None], (160, 160)))
    np.testing.assert_array_equal(out[..., 1], np.broadcast_to(left + np.arange(160)[None, :], (160, 160)))


def test_eval_ten_crop_windows():
    h, w, s = 200, 250, 160
    image = testing.coordinate_image(h, w)
    png = tf.constant(testing.encode_image(image, "PNG"))
    out = pp.eval_preprocess(png, image_size=s, resize_size=200, ten_crop_eval=True).numpy()
    assert out.shape == (10, s, s, 3)
    corners = [(0, 0), (0, w - s), (h - s, 0), (h - s, w - s), (20, 45)]
    rows = np.arange(s)[:, None]
    cols = np.arange(s)[None, :]
    for k, (y0, x0) in enumerate(corners):
        np.testing.assert_array_equal(out[k, ..., 0], np.broadcast_to(y0 + rows, (s, s)))
        np.testing.assert_array_equal(out[k, ..., 1], np.broadcast_to(x0 + cols, (s, s)))
        # Crop k + 5 is crop k of the mirrored image: column j shows original column w-1-(x0+j).
        np.testing.assert_array_equal(out[k + 5, ..., 0], np.broadcast_to(y0 + rows, (s, s)))
        np.testing.assert_array_equal(out[k + 5, ..., 1], np.broadcast_to(w - 1 - x0 - cols, (s, s)))


def test_eval_resize_then_crop_samples_the_right_pixels():
    image = testing.coordinate_image(100, 125)
    out = pp.eval_preprocess(tf.constant(image), image_size=40, resize_size=50).numpy()
    # Resized to 50 x int(50 * 125 / 100) = 50 x 62, centre crop 40 at (5, 11).
    ys = (5 + np.arange(40) + 0.5) * 100 / 50 - 0.5
    xs = (11 + np.arange(40) + 0.5) * 125 / 62 - 0.5
    np.testing.assert_allclose(out[:, 20, 0], ys, atol=0.6)
    np.testing.assert_allclose(out[20, :, 1], xs, atol=0.6)


def test_normalize():
    mean_pixel = np.array(pp.MEAN_RGB) * 255
    std_pixel = np.array(pp.STDDEV_RGB) * 255
    x = np.stack([mean_pixel, mean_pixel + std_pixel]).astype(np.float32)
    out = pp.normalize(tf.constant(x)).numpy()
    np.testing.assert_allclose(out, [[0, 0, 0], [1, 1, 1]], atol=1e-5)
    assert pp.normalize(tf.constant(x), tf.bfloat16).dtype == tf.bfloat16


def test_translate_shifts_without_flipping():
    digit = np.zeros((8, 8, 3), np.uint8)
    digit[2:6, 3] = 255  # A vertical bar.
    for i in range(10):
        out = pp.translate(tf.constant(digit), _key(i), image_size=32, max_shift=4).numpy()
        assert out.shape == (32, 32, 3)
        cols = out[..., 0].sum(0)
        shift = (cols * np.arange(32)).sum() / cols.sum() - 13.5  # Bar centred at column 13.5.
        assert abs(shift) <= 4 + 1e-4 and abs(shift - round(shift)) < 1e-4
