"""The per-example transforms (gg_jax.data.preprocessing, decoding, augmentations) against torchvision's semantics.

torchvision cannot be installed beside this torch, so its transforms are the PIL calls
torchvision makes on PIL images (`tests.reference.torchvision_transforms`): `Resize`,
`CenterCrop`, `TenCrop` and `RandomResizedCrop.get_params`.
"""

import io
import random

import numpy as np
import pytest
from PIL import Image

from gg_jax.data import augmentations, decoding, testing
from gg_jax.data import preprocessing as pp
from tests.reference.torchvision_transforms import (
    pil_open,
    tv_center_crop,
    tv_get_params,
    tv_resize,
    tv_ten_crop,
)

PHOTO_SIZES = [(375, 500), (500, 333), (480, 640)]  # ImageNet-like (H, W)


@pytest.fixture(scope="module")
def photos():
    rng = np.random.default_rng(0)
    return [testing.encode_image(testing.random_photo(rng, h, w), "JPEG", quality=90) for h, w in PHOTO_SIZES]


def _max_diff(a, b):
    return int(np.abs(np.asarray(a, np.int32) - np.asarray(b, np.int32)).max())


def test_eval_transform_matches_torchvision_within_one_grey_level(photos):
    for data in photos:
        ref = np.asarray(tv_center_crop(tv_resize(pil_open(data), 256), 224))
        out = pp.eval_crop(data, image_size=224, resize_size=256)
        assert out.shape == (224, 224, 3) and out.dtype == np.uint8
        assert _max_diff(out, ref) <= 1
        # fast-MPN-COV's fine-grained evaluation: Resize((448, 448)) and Resize(448) + CenterCrop(448).
        ref = np.asarray(tv_center_crop(tv_resize(pil_open(data), (448, 448)), 448))
        assert _max_diff(pp.eval_crop(data, image_size=448, resize_size=448, resize_mode="square"), ref) <= 1
        # CenterCropWithFlip: the centre crop of the mirrored image (an odd width left over here).
        mirror = pp.eval_crop(data, image_size=301, resize_size=320, crops="mirror")
        resized = tv_resize(pil_open(data), 320)
        assert mirror.shape == (2, 301, 301, 3)
        assert _max_diff(mirror[0], np.asarray(tv_center_crop(resized, 301))) <= 1
        assert _max_diff(mirror[1], np.asarray(tv_center_crop(resized.transpose(Image.FLIP_LEFT_RIGHT), 301))) <= 1


def test_ten_crop_matches_torchvision(photos):
    data = photos[1]
    ref = np.stack([np.asarray(c) for c in tv_ten_crop(tv_resize(pil_open(data), 256), 224)])
    out = pp.eval_crop(data, image_size=224, resize_size=256, crops="ten")
    assert out.shape == (10, 224, 224, 3)
    assert _max_diff(out, ref) <= 1


def test_eval_image_normalizes_the_eval_crop(tmp_path, photos):
    path = tmp_path / "photo.jpg"
    path.write_bytes(photos[0])
    out = pp.eval_image(str(path), image_size=224)
    assert out.shape == (224, 224, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, pp.normalize(pp.eval_crop(photos[0])), atol=1e-6)


def test_crop_windows_follow_torchvision_distribution():
    """Area share, log aspect ratio and relative offsets of 3,000 windows against the reference
    (different random streams, fixed seeds): two-sample KS tests, and the fallback rate."""
    stats = pytest.importorskip("scipy.stats")

    def features(windows, height, width):
        w = np.asarray(windows, np.float64)
        top, left, h, wd = w.T
        return {
            "area": h * wd / (height * width),
            "log_aspect": np.log(wd / h),
            "top": (top + 0.5) / (height - h + 1),
            "left": (left + 0.5) / (width - wd + 1),
        }

    for height, width in [(375, 500), (500, 333), (200, 900)]:
        ours = [pp.random_resized_crop_params(np.random.default_rng([7, i]), height, width) for i in range(3000)]
        ours = features(ours, height, width)
        rnd = random.Random(11)
        ref = features([tv_get_params(rnd, height, width) for _ in range(3000)], height, width)
        for key in ours:
            assert stats.ks_2samp(ours[key], ref[key]).pvalue > 1e-3, (height, width, key)
        assert 0.08 - 1e-3 <= ours["area"].min() and ours["area"].max() <= 1 + 1e-9
        ratio = np.exp(ours["log_aspect"])
        assert ratio.min() >= 3 / 4 - 0.02 and ratio.max() <= 4 / 3 + 0.02


def test_crop_fallback_is_torchvisions():
    # A 20:1 strip: every attempt fails, the window is the centred 4/3 box of full height.
    rng = np.random.default_rng(0)
    assert pp.random_resized_crop_params(rng, 30, 600) == tv_get_params(random.Random(0), 30, 600) == (0, 280, 30, 40)
    assert pp.random_resized_crop_params(rng, 600, 30) == (280, 0, 40, 30) == tv_get_params(random.Random(0), 600, 30)


def test_inception_crop_is_the_resized_window_then_a_flip():
    """On a lossless coordinate image (R = row, G = column): the output is the sampled window resized
    (PIL bilinear), mirrored for about half of the seeds."""
    image = testing.coordinate_image(200, 250)
    png = testing.encode_image(image, "PNG")
    flipped = 0
    for i in range(40):
        out = pp.inception_crop(png, np.random.default_rng(i), image_size=32)
        rng = np.random.default_rng(i)
        top, left, h, w = pp.random_resized_crop_params(rng, 200, 250)
        ref = np.asarray(Image.fromarray(image).resize((32, 32), Image.BILINEAR, box=(left, top, left + w, top + h)))
        mirrored = rng.random() < 0.5
        flipped += mirrored
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8
        assert _max_diff(out, ref[:, ::-1] if mirrored else ref) <= 1
        assert _max_diff(pp.inception_crop(image, np.random.default_rng(i), image_size=32), out) <= 1  # pixels in
    assert 10 <= flipped <= 30


def test_train_jpeg_dct_scaling_stays_close_to_the_full_decode():
    """Crops more than twice the output are decoded at 1/2, 1/4 or 1/8 scale: the result stays
    visually the same as decoding in full (mean error about a grey level)."""
    rng = np.random.default_rng(3)
    data = testing.encode_image(testing.random_photo(rng, 1200, 1600), "JPEG", quality=90)
    box = (100.0, 50.0, 1500.0, 1150.0)
    assert decoding._reduction(1200, 1600, 1100, 1400, 224, 224) == 4
    fast = decoding.resize_box(data, box, (224, 224), fast=True)
    full = np.asarray(pil_open(data).resize((224, 224), Image.BILINEAR, box=box))
    err = np.abs(fast.astype(np.float32) - full)
    assert err.mean() < 2.0 and np.percentile(err, 99) < 12, (err.mean(), np.percentile(err, 99))


def test_scale_aug_and_lighting():
    png = testing.encode_image(testing.coordinate_image(150, 200), "PNG")
    out, shift = pp.scale_aug(png, np.random.default_rng(0), image_size=64)
    assert out.shape == (64, 64, 3) and shift.shape == (3,) and shift.dtype == np.float32
    same, no_light = pp.scale_aug(png, np.random.default_rng(0), image_size=64, lighting_std=0.0)
    np.testing.assert_array_equal(out, same)
    assert not np.any(no_light) and np.abs(shift).max() > 0
    # normalize adds the lighting offset to every pixel of its image.
    a = pp.normalize(out[None], shift=shift[None])
    b = pp.normalize(out[None].astype(np.float32) + shift)
    np.testing.assert_allclose(a, b, atol=1e-5)
    # The shorter side is drawn from [256, 512] * 64 / 224 = [73, 146]: crops are 1x-2x zoomed.
    assert pp.resized_shape(150, 200, 73) == (73, 97) and pp.resized_shape(150, 200, 146) == (146, 194)


def test_resized_shape_like_torchvision():
    assert pp.resized_shape(375, 500, 256) == (256, 341)
    assert pp.resized_shape(500, 375, 256) == (341, 256)
    assert pp.resized_shape(256, 256, 256) == (256, 256)
    assert pp.resized_shape(375, 500, 448, "square") == (448, 448)
    with pytest.raises(ValueError, match="resize mode"):
        pp.resized_shape(3, 4, 2, "longer")


def test_eval_center_and_ten_crop_windows_exact():
    # Shorter side already 200 = resize_size: no resampling, the crops are exact.
    h, w, s = 200, 250, 160
    image = testing.coordinate_image(h, w)
    out = pp.eval_crop(testing.encode_image(image, "PNG"), image_size=s, resize_size=200, crops="ten")
    corners = [(0, 0), (0, w - s), (h - s, 0), (h - s, w - s), (20, 45)]
    rows, cols = np.arange(s)[:, None], np.arange(s)[None, :]
    for k, (y0, x0) in enumerate(corners):
        np.testing.assert_array_equal(out[k, ..., 0], np.broadcast_to(y0 + rows, (s, s)))
        np.testing.assert_array_equal(out[k, ..., 1], np.broadcast_to(x0 + cols, (s, s)))
        # Crop k + 5 is crop k of the mirrored image: column j shows original column w-1-(x0+j).
        np.testing.assert_array_equal(out[k + 5, ..., 0], np.broadcast_to(y0 + rows, (s, s)))
        np.testing.assert_array_equal(out[k + 5, ..., 1], np.broadcast_to(w - 1 - x0 - cols, (s, s)))
    np.testing.assert_array_equal(pp.eval_crop(image, image_size=s, resize_size=200), out[4])


def test_fine_grained_resize_and_crops():
    """fast-MPN-COV's transforms on a coordinate image: the shorter side or both sides resized,
    the centre crop, its mirror; a flip mirrors the columns."""
    image = testing.coordinate_image(40, 80)  # rows 0..39, columns 0..79
    rng = np.random.default_rng(0)
    shorter = pp.center_crop_flip(image, rng, image_size=20, resize_size=20, flip=False)
    # Shorter side 40 -> 20 (factor 2), width 80 -> 40; the centre 20 x 20: columns 10..29 of 40.
    ref = np.asarray(tv_center_crop(tv_resize(Image.fromarray(image), 20), 20))
    assert shorter.shape == (20, 20, 3) and _max_diff(shorter, ref) <= 1
    square = pp.center_crop_flip(image, rng, image_size=16, resize_size=20, resize_mode="square", flip=False)
    ref = np.asarray(tv_center_crop(tv_resize(Image.fromarray(image), (20, 20)), 16))
    assert _max_diff(square, ref) <= 1
    flips = [pp.center_crop_flip(image, np.random.default_rng(k), image_size=20, resize_size=20) for k in range(8)]
    mirrored = [f for f in flips if f[0, 0, 1] > f[0, -1, 1]]
    assert 0 < len(mirrored) < 8 and all(np.array_equal(f[:, ::-1], shorter) for f in mirrored)
    pair = pp.eval_crop(image, image_size=20, resize_size=20, crops="mirror")
    np.testing.assert_array_equal(pair[0], shorter)
    np.testing.assert_array_equal(pair[1], shorter[:, ::-1])
    with pytest.raises(ValueError, match="must not exceed"):
        pp.center_crop_flip(image, rng, image_size=30, resize_size=20)


def test_translate_shifts_without_flipping():
    digit = np.zeros((8, 8, 3), np.uint8)
    digit[2:6, 3] = 255  # A vertical bar.
    for i in range(10):
        out = pp.translate(digit, np.random.default_rng(i), image_size=32, max_shift=4).astype(np.float64)
        assert out.shape == (32, 32, 3)
        cols = out[..., 0].sum(0)
        shift = (cols * np.arange(32)).sum() / cols.sum() - 13.5  # Bar centred at column 13.5.
        assert abs(shift) <= 4 + 1e-6 and abs(shift - round(shift)) < 1e-6


def test_normalize():
    mean_pixel = np.array(pp.MEAN_RGB) * 255
    std_pixel = np.array(pp.STDDEV_RGB) * 255
    x = np.stack([mean_pixel, mean_pixel + std_pixel]).astype(np.float32)
    np.testing.assert_allclose(pp.normalize(x), [[0, 0, 0], [1, 1, 1]], atol=1e-5)
    import ml_dtypes

    assert pp.normalize(x, ml_dtypes.bfloat16).dtype == ml_dtypes.bfloat16


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "BMP", "JPEG-gray", "JPEG-CMYK", "PNG-RGBA"])
def test_decodes_every_format_to_rgb_like_pil(fmt):
    image = testing.random_photo(np.random.default_rng(1), 40, 56)
    pil = Image.fromarray(image)
    if fmt == "JPEG-gray":
        pil, fmt = pil.convert("L"), "JPEG"
    elif fmt == "JPEG-CMYK":
        pil, fmt = pil.convert("CMYK"), "JPEG"
    elif fmt == "PNG-RGBA":
        pil, fmt = pil.convert("RGBA"), "PNG"
    buf = io.BytesIO()
    pil.save(buf, fmt)
    data = buf.getvalue()
    assert decoding.image_shape(data) == (40, 56)
    out = pp.eval_crop(data, image_size=32, resize_size=40)
    ref = np.asarray(tv_center_crop(tv_resize(pil_open(data), 40), 32))
    assert out.shape == (32, 32, 3) and _max_diff(out, ref) <= 1


def test_undecodable_images_raise_one_error():
    good = testing.encode_image(testing.random_photo(np.random.default_rng(0), 48, 64))
    corrupt = good[:20] + bytes(range(256)) * 8
    for data in (b"not an image", b"\xff\xd8\xff\xe0garbage", corrupt, good[: len(good) // 2]):
        with pytest.raises(decoding.UndecodableImageError):
            pp.inception_crop(data, np.random.default_rng(0), image_size=16)
        with pytest.raises(decoding.UndecodableImageError):
            pp.eval_crop(data, image_size=16, resize_size=20)


def test_augmentation_registry():
    assert set(augmentations.AUGMENTATIONS) == {
        "inception_crop",
        "scale_aug",
        "translate",
        "center_crop_flip",
        "square_center_crop_flip",
        "none",
    }
    png = testing.encode_image(testing.coordinate_image(60, 80), "PNG")
    context = augmentations.AugmentContext(image_size=24, resize_size=32)
    for name in augmentations.AUGMENTATIONS:
        out = augmentations.get_augmentation(name, context)(png, np.random.default_rng(0))
        assert out["image"].shape == (24, 24, 3) and out["image"].dtype == np.uint8
        assert ("pixel_shift" in out) == (name == "scale_aug")
    with pytest.raises(ValueError, match="augment must be one of inception_crop, scale_aug"):
        augmentations.get_augmentation("mixup", context)
    with pytest.raises(ValueError, match="registered twice"):
        augmentations.register_augmentation("none", "again")(lambda c: None)
