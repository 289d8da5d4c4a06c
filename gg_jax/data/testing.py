"""Test helpers: small TFDS datasets in ArrayRecord format, image folders, test images.

`mock_tfds` writes a real, small TFDS dataset (ArrayRecord files and the metadata
TFDS keeps with them) under the directory you give, with the split sizes you
choose and the features of the registered TFDS dataset of that name, so the
pipelines and `train.py` read it exactly as a prepared dataset. Example `i` of a
split has label `i % num_classes`, so tests can tell which examples they received.
Nothing here needs TensorFlow.

    with gg_jax.data.testing.mock_tfds('imagenet2012', tmp_path, train=40, validation=13):
      it = gg_jax.data.create_train_iterator('imagenet2012', data_dir=str(tmp_path), ...)
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import shutil
import zlib

import numpy as np


def _tfds():
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    return tfds


def coordinate_image(height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3] with R = row, G = column, B = 0 (H, W <= 256)."""
    if height > 256 or width > 256:
        raise ValueError("coordinate images are at most 256x256")
    y, x = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return np.stack([y, x, np.zeros_like(y)], -1).astype(np.uint8)


def encode_image(image: np.ndarray, fmt: str = "JPEG", **kwargs) -> bytes:
    """PIL-encoded bytes (JPEG quality 90 unless `quality=` says otherwise)."""
    from PIL import Image  # pylint: disable=g-import-not-at-top

    buf = io.BytesIO()
    if fmt.upper() == "JPEG":
        kwargs.setdefault("quality", 90)
    image = np.asarray(image, np.uint8)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    Image.fromarray(image).save(buf, fmt, **kwargs)
    return buf.getvalue()


def random_photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth random image with some texture, uint8 [H, W, 3] (JPEG-compresses like a photo)."""
    from PIL import Image  # pylint: disable=g-import-not-at-top

    low = rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(low).resize((width, height), Image.BICUBIC), np.float32)
    return np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)


def write_image_folder(
    root,
    *,
    classes=("cat", "dog", "fish"),
    train_per_class=4,
    val_per_class=2,
    size=(48, 64),
    corrupt: str | None = None,
    seed: int = 0,
) -> dict:
    """Writes root/train/<class>/*.jpg and root/val/<class>/*.jpg of random photos.

    corrupt: 'train' or 'val' writes one corrupt JPEG (a valid header followed by
    garbage) into that split's first class.
    Returns {'root', 'corrupt_path'}.
    """
    rng = np.random.default_rng(seed)
    corrupt_path = None
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c in classes:
            d = os.path.join(root, split, c)
            os.makedirs(d, exist_ok=True)
            for i in range(per_class):
                h, w = size if i % 2 == 0 else size[::-1]
                data = encode_image(random_photo(rng, h, w))
                with open(os.path.join(d, f"{c}_{i:03d}.jpg"), "wb") as f:
                    f.write(data)
        if corrupt == split:
            data = encode_image(random_photo(rng, *size))
            corrupt_path = os.path.join(root, split, classes[0], f"{classes[0]}_zz_corrupt.jpg")
            with open(corrupt_path, "wb") as f:
                f.write(data[:20] + rng.integers(0, 256, len(data) // 2, dtype=np.uint8).tobytes())
    return {"root": str(root), "corrupt_path": corrupt_path}


# ------------------------------------------------------------- TFDS datasets on disk


def _fake_value(feature, key: str, i: int, rng: np.random.Generator, image_size):
    """A valid value of one TFDS feature for example `i` (images: a random photo, encoded)."""
    tfds = _tfds()
    f = tfds.features
    if isinstance(feature, f.FeaturesDict):
        return {k: _fake_value(v, f"{key}/{k}", i, rng, image_size) for k, v in feature.items()}
    if isinstance(feature, f.ClassLabel):
        return i % feature.num_classes
    if isinstance(feature, f.Image):
        h, w, c = feature.shape
        if h is None or w is None:
            h, w = image_size if image_size is not None else (int(rng.integers(32, 81)), int(rng.integers(32, 81)))
        pixels = random_photo(rng, h, w)
        pixels = pixels[..., :1] if c == 1 else pixels
        fmt = "JPEG" if getattr(feature, "_encoding_format", None) == "jpeg" or c == 3 else "PNG"
        return io.BytesIO(encode_image(pixels, fmt))
    if isinstance(feature, f.Text):
        return f"{key}_{i:06d}"
    if isinstance(feature, f.BBoxFeature):
        return f.BBox(ymin=0.1, xmin=0.2, ymax=0.7, xmax=0.9)
    if isinstance(feature, f.Tensor):
        shape = tuple(1 if d is None else d for d in feature.shape)
        return np.zeros(shape, feature.np_dtype)
    raise ValueError(f"No fake value for the feature {key!r} ({type(feature).__name__}) of this dataset")


def _write_dataset(
    data_dir: str,
    *,
    name: str,
    version: str,
    config: str | None,
    features,
    supervised_keys,
    split_sizes: dict[str, int],
    example_fn,
    num_shards: int,
) -> str:
    """Writes a TFDS dataset in ArrayRecord format with a throwaway builder; returns its folder."""
    tfds = _tfds()

    class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(version)
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=config)] if config else []
        url_infos = {}  # Nothing to download (and no checksums file to look up).

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, features=copy.deepcopy(features), supervised_keys=supervised_keys
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {split: self._generate_examples(split, n) for split, n in split_sizes.items()}

        def _generate_examples(self, split, n):
            for i in range(n):
                yield i, example_fn(split, i)

    _Builder.name = name
    tfds.disable_progress_bar()
    builder = _Builder(data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=num_shards))
    return os.fspath(builder.data_dir)


@contextlib.contextmanager
def mock_tfds(
    name: str,
    data_dir,
    image_size: tuple[int, int] | None = None,
    *,
    num_shards: int = 1,
    **split_sizes: int,
):
    """Writes TFDS dataset `name` (its registered features and version) with the given split
    sizes (e.g. train=40, validation=13) as ArrayRecord files under `data_dir`, and removes
    it on exit. Pass the same `data_dir` to the pipelines.

    image_size: (H, W) of the generated images where the feature's shape is dynamic
    (default: random sides in [32, 80]); a static shape (places365_small's 256 x 256) wins.
    """
    tfds = _tfds()
    data_dir = os.fspath(data_dir)
    registered = tfds.builder(name, data_dir=data_dir)
    info = registered.info
    keys = info.supervised_keys or ("image", "label")

    def example(split, i):
        rng = np.random.default_rng([zlib.crc32(split.encode()), i])
        ex = {k: _fake_value(v, k, i, rng, image_size) for k, v in info.features.items()}
        ex[keys[1]] = i % info.features[keys[1]].num_classes
        return ex

    folder = _write_dataset(
        data_dir,
        name=registered.name,
        version=str(registered.version),
        config=registered.builder_config.name if registered.builder_config else None,
        features=info.features,
        supervised_keys=info.supervised_keys,
        split_sizes=split_sizes,
        example_fn=example,
        num_shards=num_shards,
    )
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_tfds_dataset(
    data_dir,
    *,
    name: str = "gg_fake_images",
    num_classes: int = 100,
    num_shards: int = 4,
    size=(60, 80),
    seed: int = 0,
    encoded_images=None,
    **split_sizes: int,
) -> str:
    """Prepares a TFDS image-classification dataset on disk, as `tfds build --file_format=array_record`.

    `num_shards` ArrayRecord files per split; read back as any prepared dataset:
    `tfds.builder(name, data_dir=data_dir)`. Example i of a split is a JPEG of random
    size around `size` (or `encoded_images[i % len(encoded_images)]`) with label
    `i % num_classes`. Returns the dataset name.
    """
    tfds = _tfds()
    features = tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=num_classes),
        }
    )

    def example(split, i):
        if encoded_images is not None:
            image = encoded_images[i % len(encoded_images)]
        else:
            rng = np.random.default_rng([seed, zlib.crc32(split.encode()), i])
            h = int(size[0] * rng.uniform(0.7, 1.3))
            w = int(size[1] * rng.uniform(0.7, 1.3))
            image = encode_image(random_photo(rng, h, w))
        return {"image": io.BytesIO(image), "label": i % num_classes}

    _write_dataset(
        data_dir,
        name=name,
        version="1.0.0",
        config=None,
        features=features,
        supervised_keys=("image", "label"),
        split_sizes=split_sizes,
        example_fn=example,
        num_shards=num_shards,
    )
    return name
