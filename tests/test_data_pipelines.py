"""Input pipelines end to end: TFDS (mocked and prepared on disk), image folders, digits."""

import os

import numpy as np
import pytest

from tests import runs

pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

from gg_jax import data  # noqa: E402
from gg_jax.data import datasets as datasets_lib  # noqa: E402
from gg_jax.data import testing  # noqa: E402

LOW = (0 - np.array(data.MEAN_RGB)) / np.array(data.STDDEV_RGB)
HIGH = (1 - np.array(data.MEAN_RGB)) / np.array(data.STDDEV_RGB)


def _in_normalized_range(images, slack=1e-4):
    images = np.asarray(images, np.float32)
    return bool(np.all(images >= LOW - slack) and np.all(images <= HIGH + slack))


@pytest.fixture(scope="module")
def fake_tfds(tmp_path_factory):
    """A real TFDS dataset on disk: 4 tfrecord shards per split, label = example key (unique)."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    name = testing.write_tfds_dataset(data_dir, train=50, validation=13, num_shards=4)
    return name, data_dir


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["label"], y["label"])
        np.testing.assert_array_equal(x["image"], y["image"])


# ---------------------------------------------------------------- mocked TFDS


@pytest.mark.parametrize(
    "name,splits,ten_crop",
    [
        ("imagenet2012", {"train": 24, "validation": 13}, False),
        ("places365_small", {"train": 24, "validation": 13}, True),
        ("cifar10", {"train": 24, "test": 13}, False),
    ],
)
def test_mocked_tfds_pipelines(tmp_path, name, splits, ten_crop):
    with testing.mock_tfds(name, tmp_path, **splits):
        info = data.get_dataset_info(name, data_dir=str(tmp_path))
        eval_split = "test" if name == "cifar10" else "validation"
        assert (info.num_train_examples, info.num_eval_examples, info.eval_split) == (24, 13, eval_split)
        assert info.num_classes == {"imagenet2012": 1000, "places365_small": 365, "cifar10": 10}[name]

        for cache in (False, True):
            it = data.create_train_iterator(
                name, data_dir=str(tmp_path), global_batch_size=8, image_size=32, cache=cache
            )
            for batch in _take(it, 4):  # Crosses the epoch boundary (3 steps per epoch).
                assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
                assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
                assert _in_normalized_range(batch["image"])
                labels = np.asarray(batch["label"])
                assert labels.min() >= 0 and labels.max() < info.num_classes

        ev = data.create_eval_iterator(
            name, data_dir=str(tmp_path), global_batch_size=8, image_size=32, resize_size=36, ten_crop=ten_crop
        )
        batches = list(ev)
        assert len(batches) == len(ev) == data.num_eval_batches(info, 8) == 2
        seen = []
        for b in batches:
            assert b["image"].shape == ((8, 10, 32, 32, 3) if ten_crop else (8, 32, 32, 3))
            assert b["mask"].dtype == np.bool_ and b["label"].dtype == np.int32
            seen += list(np.asarray(b["label"])[np.asarray(b["mask"])])
            assert _in_normalized_range(np.asarray(b["image"])[np.asarray(b["mask"])])
        # Example i has label i % num_classes: every example exactly once.
        assert sorted(seen) == sorted(i % info.num_classes for i in range(13))

        # Each process reads its own shard and sees local batches.
        for p in range(2):
            local = next(
                data.train_batches(
                    name, data_dir=str(tmp_path), global_batch_size=8, process_index=p, process_count=2, image_size=32
                )
            )
            assert local["image"].shape == (4, 32, 32, 3)


# ----------------------------------------------------- TFDS prepared on disk


def test_tfds_info_and_shapes(fake_tfds):
    name, data_dir = fake_tfds
    info = data.get_dataset_info(name, data_dir)
    assert info == data.DatasetInfo(name, 100, 50, 13, "train", "validation", data_dir)
    assert data.steps_per_epoch(info, 8) == 6 and data.num_eval_batches(info, 8) == 2
    batch = next(
        data.create_train_iterator(
            name, data_dir=data_dir, global_batch_size=4, image_size=48, augment="scale_aug", cache=False
        )
    )
    assert batch["image"].shape == (4, 48, 48, 3)


@pytest.mark.parametrize("cache", [False, True], ids=["streaming", "cached"])
def test_resume_equals_skipping(fake_tfds, cache):
    name, data_dir = fake_tfds
    kw = dict(
        data_dir=data_dir, global_batch_size=8, image_size=24, seed=3, cache=cache, process_index=0, process_count=1
    )
    ref = _take(data.train_batches(name, **kw), 14)  # 6 steps per epoch: crosses two epochs.
    _assert_batches_equal(ref, _take(data.train_batches(name, **kw), 14))  # Deterministic.
    for k in (1, 6, 9):
        _assert_batches_equal(ref[k:], _take(data.train_batches(name, start_step=k, **kw), 14 - k))
    # Epochs are reshuffled; a different seed gives a different order.
    assert not np.array_equal(ref[0]["label"], ref[6]["label"])
    other = next(data.train_batches(name, **{**kw, "seed": 4}))
    assert not np.array_equal(ref[0]["label"], other["label"])
    # An epoch holds each example at most once (the remainder 50 - 48 is dropped).
    epoch = np.concatenate([b["label"] for b in ref[:6]])
    assert len(set(epoch.tolist())) == 48


@pytest.mark.parametrize("cache", [False, True], ids=["streaming", "cached"])
def test_train_shards_are_disjoint_per_process(fake_tfds, cache):
    name, data_dir = fake_tfds
    builder = tfds.builder(name, data_dir=data_dir)
    per_process = []
    for p in range(2):
        it = data.train_batches(
            name, data_dir=data_dir, global_batch_size=8, process_index=p, process_count=2, image_size=16, cache=cache
        )
        labels = np.concatenate([b["label"] for b in _take(it, 6)])  # One epoch: 6 x 4 examples.
        assert len(set(labels.tolist())) == 24
        # The process reads only its own even split of the files.
        own = {int(ex["label"]) for ex in builder.as_dataset(split=tfds.even_splits("train", 2)[p])}
        assert set(labels.tolist()) <= own
        per_process.append(set(labels.tolist()))
    assert not per_process[0] & per_process[1]


def test_shard_range_matches_tfds_even_splits(fake_tfds):
    name, data_dir = fake_tfds
    from tensorflow_datasets.core import splits as splits_lib

    split_infos = tfds.builder(name, data_dir=data_dir).info.splits
    for n in (1, 2, 3, 4, 5, 8):
        starts = []
        for i in range(n):
            (inst,) = splits_lib.AbstractSplit.from_spec(tfds.even_splits("validation", n)[i]).to_absolute(split_infos)
            assert (inst.from_ or 0, 13 if inst.to is None else inst.to) == data.shard_range(13, i, n)
            starts.append(data.shard_range(13, i, n))
        # The shards partition [0, 13).
        assert [s for s, _ in starts] == [0] + [e for _, e in starts[:-1]] and starts[-1][1] == 13


@pytest.mark.parametrize("process_count", [1, 2, 3, 4])
def test_eval_exactly_once_across_processes(fake_tfds, process_count):
    name, data_dir = fake_tfds
    global_batch = 2 * process_count  # 13 does not divide.
    seen = []
    lengths = set()
    for p in range(process_count):
        it = data.eval_batches(
            name,
            data_dir=data_dir,
            global_batch_size=global_batch,
            process_index=p,
            process_count=process_count,
            image_size=16,
            resize_size=20,
        )
        batches = list(it)
        lengths.add(len(batches))
        for b in batches:
            assert b["image"].shape == (2, 16, 16, 3)
            seen += list(b["label"][b["mask"]])
    # Every process yields the same number of batches; each example counted once.
    assert lengths == {-(-13 // global_batch)}
    builder = tfds.builder(name, data_dir=data_dir)
    expected = sorted(int(ex["label"]) for ex in builder.as_dataset(split="validation"))
    assert sorted(seen) == expected and len(set(seen)) == 13


# --------------------------------------------------------------- image folder


def test_image_folder(tmp_path):
    testing.write_image_folder(tmp_path, classes=("b_dog", "a_cat", "c_fish"), train_per_class=6, val_per_class=3)
    info = data.get_dataset_info("image_folder", str(tmp_path))
    assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (3, 18, 9)
    assert info.class_names == ("a_cat", "b_dog", "c_fish") and info.eval_split == "val"
    batch = next(data.create_train_iterator("image_folder", data_dir=str(tmp_path), global_batch_size=6, image_size=32))
    assert batch["image"].shape == (6, 32, 32, 3) and _in_normalized_range(batch["image"])
    seen = []
    for b in data.create_eval_iterator(
        "image_folder", data_dir=str(tmp_path), global_batch_size=4, image_size=32, resize_size=40
    ):
        seen += list(np.asarray(b["label"])[np.asarray(b["mask"])])
    assert sorted(seen) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_image_folder_resume_never_reads_skipped_files(tmp_path):
    testing.write_image_folder(tmp_path, train_per_class=8, val_per_class=1)  # 24 train images.
    kw = dict(data_dir=str(tmp_path), global_batch_size=4, image_size=16, process_index=0, process_count=1)
    ref = _take(data.train_batches("image_folder", **kw), 6)  # Epoch 0 = steps 0-5.
    it = data.train_batches("image_folder", start_step=3, **kw)
    _, order = it.epoch_dataset(0)
    source = it.source
    paths = source.paths("train", 0, 1)
    # Replace the 12 images of steps 0-2 by garbage: a resumed run must not even read them.
    for path in paths[order[:12]]:
        with open(path, "wb") as f:
            f.write(b"not an image")
    _assert_batches_equal(ref[3:], _take(it, 3))


@pytest.mark.parametrize("split", ["train", "val"])
def test_image_folder_corrupt_jpeg_is_reported_with_its_path(tmp_path, split):
    info = testing.write_image_folder(tmp_path, train_per_class=3, val_per_class=3, corrupt=split)
    kw = dict(data_dir=str(tmp_path), global_batch_size=4, image_size=16)
    it = (
        data.create_train_iterator("image_folder", **kw)
        if split == "train"
        else data.create_eval_iterator("image_folder", **kw, resize_size=20)
    )
    with pytest.raises(data.CorruptImageError) as e:
        for _ in range(20):
            next(it)
    assert e.value.path == info["corrupt_path"]
    assert info["corrupt_path"] in str(e.value)
    # The file and the decoder's reason; TensorFlow's traceback is not chained to it.
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_image_folder_problems_are_found_when_it_is_opened(tmp_path, caplog):
    """Empty class folders are warned about (each is still a class); a missing evaluation
    split is an error before any training, not at the first evaluation."""
    testing.write_image_folder(tmp_path, classes=("cat", "dog"), train_per_class=2, val_per_class=1)
    (tmp_path / "train" / "empty_class").mkdir()
    (tmp_path / "val" / "only_in_val").mkdir()
    (tmp_path / "val" / "only_in_val" / "notes.txt").write_text("not an image")
    with caplog.at_level("WARNING"):
        info = data.get_dataset_info("image_folder", str(tmp_path))
    assert info.num_classes == 4 and info.class_names == ("cat", "dog", "empty_class", "only_in_val")
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "2 class folder(s) hold no image" in warned, warned
    assert str(tmp_path / "train" / "empty_class") in warned and str(tmp_path / "val" / "only_in_val") in warned
    assert "no training image: only_in_val" in warned, warned
    for f in (tmp_path / "val").rglob("*.jpg"):
        f.unlink()
    with pytest.raises(data.DatasetNotFoundError, match="No evaluation images under"):
        data.get_dataset_info("image_folder", str(tmp_path))


def test_image_folder_missing(tmp_path):
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.get_dataset_info("image_folder", str(tmp_path / "nowhere"))
    assert "train/<class_name>/<image>.jpg" in str(e.value)
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="No images found"):
        data.get_dataset_info("image_folder", str(tmp_path))


# --------------------------------------------------------------------- digits


def test_digits():
    info = data.get_dataset_info("digits")
    assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (10, 1437, 360)
    assert (info.train_split, info.eval_split) == ("train", "test")
    from gg_jax.data import digits

    train_x, train_y = digits.load("train")
    test_x, test_y = digits.load("test")
    assert train_x.shape == (1437, 8, 8) and test_x.shape == (360, 8, 8)
    assert np.all(np.bincount(test_y, minlength=10) >= 35)  # Stratified.
    # Train and test are disjoint (no identical image in both).
    train_rows = {x.tobytes() for x in train_x}
    assert sum(x.tobytes() in train_rows for x in test_x) <= 2  # The UCI set has a few duplicates.

    it = data.create_train_iterator("digits", global_batch_size=16, image_size=32, seed=1)
    batch = next(it)
    assert batch["image"].shape == (16, 32, 32, 3) and batch["label"].dtype == np.int32
    assert _in_normalized_range(batch["image"])
    seen = []
    for b in data.create_eval_iterator("digits", global_batch_size=64, image_size=32):
        assert b["image"].shape == (64, 32, 32, 3)
        seen += list(np.asarray(b["label"])[np.asarray(b["mask"])])
    np.testing.assert_array_equal(np.bincount(seen, minlength=10), np.bincount(test_y, minlength=10))
    with pytest.raises(ValueError, match="ten_crop"):
        data.create_eval_iterator("digits", global_batch_size=8, ten_crop=True)


def test_bfloat16_output():
    import jax.numpy as jnp

    batch = next(data.create_train_iterator("digits", global_batch_size=8, image_size=8, dtype=jnp.bfloat16))
    assert batch["image"].dtype == jnp.bfloat16 and batch["label"].dtype == np.int32


def test_digits_resume():
    kw = dict(global_batch_size=32, image_size=16, seed=7, process_index=0, process_count=1)
    ref = _take(data.train_batches("digits", **kw), 50)  # 44 steps per epoch.
    _assert_batches_equal(ref[42:], _take(data.train_batches("digits", start_step=42, **kw), 8))


# --------------------------------------------------------------------- errors


def test_missing_tfds_datasets_explain_how_to_prepare(tmp_path, caplog):
    with caplog.at_level("INFO"):
        with pytest.raises(data.DatasetNotFoundError) as e:
            data.get_dataset_info("imagenet2012", str(tmp_path))
        msg = str(e.value)
        assert (
            "ILSVRC2012_img_train.tar" in msg and f"tfds build imagenet2012 --data_dir={tmp_path} --manual_dir=" in msg
        )
        assert isinstance(e.value, FileNotFoundError)
        with pytest.raises(data.DatasetNotFoundError, match=f"tfds build places365_small --data_dir={tmp_path}"):
            data.get_dataset_info("places365_small", str(tmp_path / "no_such_dir"))
        with pytest.raises(data.DatasetNotFoundError, match="Unknown dataset 'surely_no_such_dataset'") as e:
            data.get_dataset_info("surely_no_such_dataset", str(tmp_path))
        assert "\n" not in str(e.value)  # Not TFDS's list of every dataset name.
    # The error is all: no TFDS warning about the dataset folder that is not there.
    assert not [r.getMessage() for r in caplog.records if "dataset_info.json" in r.getMessage()]


def test_batch_errors(fake_tfds):
    name, data_dir = fake_tfds
    with pytest.raises(ValueError, match="not divisible"):
        data.train_batches(name, data_dir=data_dir, global_batch_size=10, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="larger than"):
        data.train_batches(name, data_dir=data_dir, global_batch_size=64, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="augment"):
        data.train_batches(
            name, data_dir=data_dir, global_batch_size=8, augment="mixup", process_index=0, process_count=1
        )


def test_import_does_not_load_tensorflow_and_tf_sees_no_gpu():
    code = (
        "import sys, gg_jax, gg_jax.data\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n"
        "next(gg_jax.data.create_train_iterator('digits', global_batch_size=8, image_size=8))\n"
        "import tensorflow as tf\n"
        "assert tf.config.get_visible_devices('GPU') == []\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    runs.run(["-c", code], env)


def test_corrupt_image_error_finder(tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(testing.encode_image(testing.coordinate_image(4, 4), "PNG"))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0garbage")
    assert datasets_lib.find_corrupt_image([str(good)]) is None
    err = datasets_lib.find_corrupt_image([str(good), str(bad)])
    assert isinstance(err, data.CorruptImageError) and err.path == str(bad)
