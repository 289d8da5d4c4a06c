"""Test helpers: mocked TFDS datasets with consistent split sizes, generated image folders.

`mock_tfds` wraps `tfds.testing.mock_data` so that pipelines run their real code
on generated data: it writes the dataset's metadata (with the split sizes you
choose) to a temporary directory, and serves every (sub-)split with exactly the
examples it should hold. Example `i` of a split is generated deterministically
from `i` and has label `i % num_classes`, so tests can tell which examples they
received.

    with gg_jax.data.testing.mock_tfds('imagenet2012', tmp_path, train=40, validation=13):
      it = gg_jax.data.create_train_iterator('imagenet2012', data_dir=str(tmp_path), ...)

(`data_dir` is ignored while mocked; any value works.)
"""

from __future__ import annotations

import contextlib
import io
import os
import zlib

import numpy as np

from gg_jax.data._tf import tf as _tf
from gg_jax.data._tf import tfds as _tfds


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
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, fmt, **kwargs)
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


def _write_metadata(name: str, metadata_dir: str, split_sizes: dict[str, int]):
    tfds = _tfds()
    builder = tfds.builder(name, data_dir=metadata_dir)
    info = builder.info
    split_infos = [
        tfds.core.SplitInfo(name=split, shard_lengths=[n], num_bytes=1000 * n) for split, n in split_sizes.items()
    ]
    info.set_splits(tfds.core.SplitDict(split_infos))
    os.makedirs(builder.data_dir, exist_ok=True)
    info.write_to_directory(builder.data_dir)


def _split_indices(split, split_infos) -> list[tuple[str, int, int]]:
    from tensorflow_datasets.core import splits as splits_lib  # pylint: disable=g-import-not-at-top

    out = []
    for inst in splits_lib.AbstractSplit.from_spec(split).to_absolute(split_infos):
        stop = split_infos[inst.splitname].num_examples if inst.to is None else inst.to
        out.append((inst.splitname, inst.from_ or 0, stop))
    return out


@contextlib.contextmanager
def mock_tfds(name: str, metadata_dir, image_size: tuple[int, int] | None = None, **split_sizes: int):
    """Mocks TFDS dataset `name` with the given split sizes (e.g. train=40, validation=13).

    image_size: (H, W) of the generated images (default: the feature's shape, or
    random 5..50 sides where it is dynamic).
    """
    tf, tfds = _tf(), _tfds()
    from tensorflow_datasets.testing import mocking  # pylint: disable=g-import-not-at-top

    metadata_dir = os.fspath(metadata_dir)
    _write_metadata(name, metadata_dir, split_sizes)

    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
        del read_config, shuffle_files
        features = self.info.features
        num_classes = features["label"].num_classes
        gen_cls, sub_features, specs, decode_fn = mocking._get_fake_data_components(  # pylint: disable=protected-access
            decoders, features
        )
        ranges = _split_indices(split, self.info.splits)

        def generate():
            for split_name, start, stop in ranges:
                gen = gen_cls(sub_features, num_examples=stop, seed=zlib.crc32(split_name.encode()) % 1000 * 100_000)
                for i in range(start, stop):
                    ex = mocking.RandomFakeGenerator.__getitem__(gen, i)
                    if image_size is not None and None in features["image"].shape:
                        rng = np.random.default_rng(i)
                        ex["image"] = rng.integers(0, 256, image_size + (3,), dtype=np.uint8)
                    ex["label"] = i % num_classes
                    if gen_cls is not mocking.RandomFakeGenerator:
                        ex = sub_features.encode_example(ex)
                    yield ex

        ds = tf.data.Dataset.from_generator(
            generate,
            output_signature=tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), specs),
        )
        return ds.map(decode_fn)

    with tfds.testing.mock_data(
        policy=tfds.testing.MockPolicy.USE_FILES, data_dir=metadata_dir, as_dataset_fn=as_dataset
    ):
        yield


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
    """Prepares a real (not mocked) TFDS image-classification dataset on disk.

    Written by a TFDS builder as tfrecord shards (`num_shards` per split), it is
    read back as any prepared dataset: `tfds.builder(name, data_dir=data_dir)`.
    Example i of a split is a JPEG of random size around `size` (or
    `encoded_images[i % len(encoded_images)]`) with label `i % num_classes`.
    Returns the dataset name.
    """
    tfds = _tfds()

    class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")
        url_infos = {}  # Nothing to download (and no checksums file to look up).

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                        "label": tfds.features.ClassLabel(num_classes=num_classes),
                    }
                ),
                supervised_keys=("image", "label"),
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {split: self._generate_examples(split, n) for split, n in split_sizes.items()}

        def _generate_examples(self, split, n):
            rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
            for i in range(n):
                if encoded_images is not None:
                    image = encoded_images[i % len(encoded_images)]
                else:
                    h = int(size[0] * rng.uniform(0.7, 1.3))
                    w = int(size[1] * rng.uniform(0.7, 1.3))
                    image = encode_image(random_photo(rng, h, w))
                yield i, {"image": image, "label": i % num_classes}

    _Builder.name = name
    tfds.disable_progress_bar()
    builder = _Builder(data_dir=os.fspath(data_dir))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=num_shards))
    return name
