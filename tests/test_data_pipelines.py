"""Input pipelines end to end: TFDS (ArrayRecord), image folders, digits, synthetic; resume, errors."""

import json
import multiprocessing
import os
import signal
import time

import numpy as np
import pytest

from gg_jax import data
from gg_jax.data import datasets as datasets_lib
from gg_jax.data import sources, testing
from tests import runs

LOW = (0 - np.array(data.MEAN_RGB)) / np.array(data.STDDEV_RGB)
HIGH = (1 - np.array(data.MEAN_RGB)) / np.array(data.STDDEV_RGB)
LOCAL = dict(process_index=0, process_count=1)


def _in_normalized_range(images, slack=1e-4):
    images = np.asarray(images, np.float32)
    return bool(np.all(images >= LOW - slack) and np.all(images <= HIGH + slack))


@pytest.fixture(scope="module")
def fake_tfds(tmp_path_factory):
    """A TFDS dataset on disk: 4 ArrayRecord files per split, 100 classes (labels unique per split)."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    name = testing.write_tfds_dataset(data_dir, train=50, validation=13, num_shards=4)
    return name, data_dir


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x["label"]), np.asarray(y["label"]))
        np.testing.assert_array_equal(np.asarray(x["image"]), np.asarray(y["image"]))


def _split_labels(name, data_dir, split, start=0, stop=None):
    source = datasets_lib.get_source(name, data_dir)
    stop = source.split_size(split) if stop is None else stop
    return [source.record(split, i)[1] for i in range(start, stop)]


# ---------------------------------------------------------------- TFDS datasets


@pytest.mark.parametrize(
    "name,splits,ten_crop",
    [
        ("imagenet2012", {"train": 24, "validation": 13}, False),
        ("places365_small", {"train": 24, "validation": 13}, True),
        ("cifar10", {"train": 24, "test": 13}, False),
    ],
)
def test_mocked_tfds_pipelines(tmp_path, name, splits, ten_crop):
    with testing.mock_tfds(name, tmp_path, image_size=(40, 52), **splits):
        info = data.get_dataset_info(name, data_dir=str(tmp_path))
        eval_split = "test" if name == "cifar10" else "validation"
        assert (info.num_train_examples, info.num_eval_examples, info.eval_split) == (24, 13, eval_split)
        assert info.num_classes == {"imagenet2012": 1000, "places365_small": 365, "cifar10": 10}[name]

        it = data.create_train_iterator(name, data_dir=str(tmp_path), global_batch_size=8, image_size=32, num_workers=0)
        for batch in _take(it, 4):  # Crosses the epoch boundary (3 steps per epoch).
            assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
            assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
            assert _in_normalized_range(batch["image"])
            labels = np.asarray(batch["label"])
            assert labels.min() >= 0 and labels.max() < info.num_classes

        ev = data.create_eval_iterator(
            name,
            data_dir=str(tmp_path),
            global_batch_size=8,
            image_size=32,
            resize_size=36,
            ten_crop=ten_crop,
            num_workers=0,
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
                    name,
                    data_dir=str(tmp_path),
                    global_batch_size=8,
                    process_index=p,
                    process_count=2,
                    image_size=32,
                    num_workers=0,
                )
            )
            assert local["image"].shape == (4, 32, 32, 3)


def test_tfds_info_and_shapes(fake_tfds):
    name, data_dir = fake_tfds
    info = data.get_dataset_info(name, data_dir)
    assert info == data.DatasetInfo(name, 100, 50, 13, "train", "validation", data_dir)
    assert data.steps_per_epoch(info, 8) == 6 and data.num_eval_batches(info, 8) == 2
    batch = next(
        data.create_train_iterator(
            name, data_dir=data_dir, global_batch_size=4, image_size=48, augment="scale_aug", num_workers=0
        )
    )
    assert batch["image"].shape == (4, 48, 48, 3) and "pixel_shift" not in batch


def test_worker_processes_give_the_same_batches(fake_tfds):
    """2 worker processes (batch k made by worker k % 2) and one thread: the same batches."""
    name, data_dir = fake_tfds
    kw = dict(data_dir=data_dir, global_batch_size=8, image_size=24, seed=3, augment="scale_aug")
    ref = _take(data.train_batches(name, num_workers=0, **kw, **LOCAL), 8)
    it = data.create_train_iterator(name, num_workers=2, **kw)
    _assert_batches_equal(ref, [{**b, "image": np.asarray(b["image"])} for b in _take(it, 8)])
    it.close()


def test_resume_equals_skipping(fake_tfds):
    name, data_dir = fake_tfds
    kw = dict(data_dir=data_dir, global_batch_size=8, image_size=24, seed=3, num_workers=0, **LOCAL)
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


def test_train_shards_are_disjoint_per_process(fake_tfds):
    name, data_dir = fake_tfds
    per_process = []
    for p in range(2):
        it = data.train_batches(
            name, data_dir=data_dir, global_batch_size=8, process_index=p, process_count=2, image_size=16, num_workers=0
        )
        labels = np.concatenate([b["label"] for b in _take(it, 6)])  # One epoch: 6 x 4 examples.
        assert len(set(labels.tolist())) == 24
        # The process reads only its own part of the split.
        start, stop = data.shard_range(50, p, 2)
        assert set(labels.tolist()) <= set(_split_labels(name, data_dir, "train", start, stop))
        per_process.append(set(labels.tolist()))
    assert not per_process[0] & per_process[1]


def test_shard_range_is_tfds_even_splits_and_grain_even_split(fake_tfds):
    import grain
    import tensorflow_datasets as tfds
    from grain._src.core import sharding as grain_sharding
    from tensorflow_datasets.core import splits as splits_lib

    name, data_dir = fake_tfds
    split_infos = tfds.builder(name, data_dir=data_dir).info.splits
    for n in (1, 2, 3, 4, 5, 8):
        starts = []
        for i in range(n):
            (inst,) = splits_lib.AbstractSplit.from_spec(tfds.even_splits("validation", n)[i]).to_absolute(split_infos)
            assert (inst.from_ or 0, 13 if inst.to is None else inst.to) == data.shard_range(13, i, n)
            options = grain.sharding.ShardOptions(shard_index=i, shard_count=n, drop_remainder=False)
            assert grain_sharding.even_split(13, options) == data.shard_range(13, i, n)
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
            num_workers=0,
        )
        batches = list(it)
        lengths.add(len(batches))
        for b in batches:
            assert b["image"].shape == (2, 16, 16, 3)
            seen += list(b["label"][b["mask"]])
    # Every process yields the same number of batches; each example counted once.
    assert lengths == {-(-13 // global_batch)}
    assert sorted(seen) == sorted(_split_labels(name, data_dir, "validation")) and len(set(seen)) == 13


def test_iterator_state_checkpointed_with_orbax(fake_tfds, tmp_path):
    """Grain's checkpoint handler saves the train iterator's state next to an array in an Orbax
    CheckpointManager; a new iterator restored from it continues with the uninterrupted batches."""
    import grain
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    name, data_dir = fake_tfds
    kw = dict(data_dir=data_dir, global_batch_size=8, image_size=16, seed=5, num_workers=0)
    ref = _take(data.create_train_iterator(name, **kw), 9)
    it = data.create_train_iterator(name, **kw)
    _take(it, 4)
    manager = ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("params", "data"))
    params = {"w": jnp.arange(3.0)}
    manager.save(
        4, args=ocp.args.Composite(params=ocp.args.StandardSave(params), data=grain.checkpoint.CheckpointSave(it))
    )
    manager.wait_until_finished()
    _take(it, 2)  # Advancing after the save does not change what was saved.
    it.close()

    resumed = data.create_train_iterator(name, **kw)
    restored = manager.restore(
        4,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(params), data=grain.checkpoint.CheckpointRestore(resumed)
        ),
    )
    assert restored["data"] is resumed and resumed.get_state()["step"] == 4
    np.testing.assert_array_equal(restored["params"]["w"], params["w"])
    _assert_batches_equal(ref[4:], _take(resumed, 5))
    saved = json.loads((tmp_path / "ckpt" / "4" / "data" / "process_0-of-1.json").read_text())
    assert saved == {"step": 4, "seed": 5, "shard_index": 0, "shard_count": 1, "dataset": name}
    manager.close()


# --------------------------------------------------------------- image folder


def test_image_folder(tmp_path):
    testing.write_image_folder(tmp_path, classes=("b_dog", "a_cat", "c_fish"), train_per_class=6, val_per_class=3)
    info = data.get_dataset_info("image_folder", str(tmp_path))
    assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (3, 18, 9)
    assert info.class_names == ("a_cat", "b_dog", "c_fish") and info.eval_split == "val"
    it = data.create_train_iterator(
        "image_folder", data_dir=str(tmp_path), global_batch_size=6, image_size=32, num_workers=0
    )
    batch = next(it)
    assert batch["image"].shape == (6, 32, 32, 3) and _in_normalized_range(batch["image"])
    seen = []
    for b in data.create_eval_iterator(
        "image_folder", data_dir=str(tmp_path), global_batch_size=4, image_size=32, resize_size=40, num_workers=0
    ):
        seen += list(np.asarray(b["label"])[np.asarray(b["mask"])])
    assert sorted(seen) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_image_folder_resume_never_reads_skipped_files(tmp_path):
    testing.write_image_folder(tmp_path, train_per_class=8, val_per_class=1)  # 24 train images.
    kw = dict(data_dir=str(tmp_path), global_batch_size=4, image_size=16, num_workers=0, **LOCAL)
    ref = _take(data.train_batches("image_folder", **kw), 6)  # Epoch 0 = steps 0-5.
    it = data.train_batches("image_folder", start_step=3, **kw)
    example = it.example_fn()
    paths = it.source.paths("train")
    # Replace the 12 images of steps 0-2 by garbage: a resumed run must not even read them.
    for path in paths[example.order(0)[:12]]:
        with open(path, "wb") as f:
            f.write(b"not an image")
    _assert_batches_equal(ref[3:], _take(it, 3))


@pytest.mark.parametrize("split,num_workers", [("train", 2), ("val", 0)])
def test_image_folder_corrupt_jpeg_is_reported_with_its_path(tmp_path, split, num_workers):
    info = testing.write_image_folder(tmp_path, train_per_class=3, val_per_class=3, corrupt=split)
    kw = dict(data_dir=str(tmp_path), global_batch_size=4, image_size=16, num_workers=num_workers)
    it = (
        data.create_train_iterator("image_folder", **kw)
        if split == "train"
        else data.create_eval_iterator("image_folder", **kw, resize_size=20)
    )
    with pytest.raises(data.CorruptImageError) as e:
        for _ in range(20):
            next(it)
    assert e.value.path == info["corrupt_path"]
    assert (
        str(e.value) == f"Corrupt or unreadable image file {info['corrupt_path']}: {e.value.reason}" and e.value.reason
    )
    # The file and the decoder's reason; the worker's traceback is not chained to it.
    assert e.value.__cause__ is None and e.value.__suppress_context__
    it.close()


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


# ----------------------------------------------------------- digits, synthetic


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
    assert it.local.num_workers == 0  # In-memory pixels: no worker processes.
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


def test_digits_are_never_flipped():
    """A digit's training image is its eval image shifted by whole pixels, never mirrored."""
    it = data.train_batches("digits", global_batch_size=32, image_size=16, augment="translate", **LOCAL)
    ev = next(data.eval_batches("digits", global_batch_size=1437, image_size=16, split="train", **LOCAL))
    example = it.example_fn()
    batch = next(it)
    for k in range(32):
        original = ev["image"][example.order(0)[k]]
        shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]

        def shifted(img, dy, dx):
            out = np.full_like(img, LOW.astype(np.float32))
            ys, xs = slice(max(dy, 0), 16 + min(dy, 0)), slice(max(dx, 0), 16 + min(dx, 0))
            yo, xo = slice(max(-dy, 0), 16 + min(-dy, 0)), slice(max(-dx, 0), 16 + min(-dx, 0))
            out[ys, xs] = img[yo, xo]
            return out

        assert any(np.allclose(batch["image"][k], shifted(original, dy, dx), atol=1e-5) for dy, dx in shifts), k


def test_bfloat16_output():
    import jax.numpy as jnp

    batch = next(data.create_train_iterator("digits", global_batch_size=8, image_size=8, dtype=jnp.bfloat16))
    assert batch["image"].dtype == jnp.bfloat16 and batch["label"].dtype == np.int32
    local = next(data.train_batches("digits", global_batch_size=8, image_size=8, dtype=jnp.bfloat16, **LOCAL))
    assert local["image"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(batch["image"], np.float32), local["image"].astype(np.float32), atol=1e-2)


def test_digits_resume():
    kw = dict(global_batch_size=32, image_size=16, seed=7, **LOCAL)
    ref = _take(data.train_batches("digits", **kw), 50)  # 44 steps per epoch.
    _assert_batches_equal(ref[42:], _take(data.train_batches("digits", start_step=42, **kw), 8))


def test_synthetic_source():
    info = data.get_dataset_info("synthetic")
    assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (1000, 1_281_167, 50_000)
    batch = next(data.train_batches("synthetic", global_batch_size=4, image_size=64, num_workers=0, **LOCAL))
    assert batch["image"].shape == (4, 64, 64, 3) and _in_normalized_range(batch["image"])
    source = datasets_lib.get_source("synthetic")
    image, label = source.record("train", 1003)
    assert image[:3] == b"\xff\xd8\xff" and label == 3
    assert data.get_dataset_info("synthetic") == info


def test_source_registry(tmp_path):
    assert {"digits", "image_folder", "synthetic"} <= set(data.SOURCES)

    @data.register_source("gg_test_tiny")
    def _tiny(data_dir):
        pixels = np.zeros((6, 4, 4, 3), np.uint8)
        info = data.DatasetInfo("gg_test_tiny", 2, 6, 6, "train", "train")
        return sources.ArraySource(info, {"train": ("pixels", pixels, np.arange(6) % 2)})

    try:
        batch = next(data.train_batches("gg_test_tiny", global_batch_size=2, image_size=8, num_workers=0, **LOCAL))
        assert batch["image"].shape == (2, 8, 8, 3)
        with pytest.raises(ValueError, match="registered twice"):
            data.register_source("gg_test_tiny")(_tiny)
    finally:
        del data.SOURCES["gg_test_tiny"]


# --------------------------------------------------------------------- errors


def test_missing_tfds_datasets_explain_how_to_prepare(tmp_path, caplog):
    with caplog.at_level("INFO"):
        with pytest.raises(data.DatasetNotFoundError) as e:
            data.get_dataset_info("imagenet2012", str(tmp_path))
        msg = str(e.value)
        assert "ILSVRC2012_img_train.tar" in msg
        assert (
            f"tfds build imagenet2012 --data_dir={tmp_path} --manual_dir=MANUAL_DIR --file_format=array_record" in msg
        )
        assert isinstance(e.value, FileNotFoundError)
        with pytest.raises(data.DatasetNotFoundError, match=f"tfds build places365_small --data_dir={tmp_path}"):
            data.get_dataset_info("places365_small", str(tmp_path / "no_such_dir"))
        with pytest.raises(data.DatasetNotFoundError, match="Unknown dataset 'surely_no_such_dataset'") as e:
            data.get_dataset_info("surely_no_such_dataset", str(tmp_path))
        assert "\n" not in str(e.value)  # Not TFDS's list of every dataset name.
    # The error is all: no TFDS warning about the dataset folder that is not there.
    assert not [r.getMessage() for r in caplog.records if "dataset_info.json" in r.getMessage()]


def test_tfrecord_only_and_missing_arrayrecord_files_are_explained(tmp_path):
    name = testing.write_tfds_dataset(tmp_path, name="gg_format_check", train=6, validation=3, num_shards=2)
    folder = tmp_path / name / "1.0.0"
    info_file = folder / "dataset_info.json"
    original = info_file.read_text()
    meta = json.loads(original)
    meta["fileFormat"] = "tfrecord"  # What `tfds build` without --file_format=array_record writes.
    info_file.write_text(json.dumps(meta))
    with pytest.raises(data.DatasetFormatError) as e:
        data.get_dataset_info(name, str(tmp_path))
    assert "tfds convert_format" in str(e.value) and f"--dataset_version_dir={folder}" in str(e.value)
    assert "--out_file_format=array_record" in str(e.value)
    info_file.write_text(original)
    missing = folder / f"{name}-validation.array_record-00001-of-00002"
    missing.unlink()
    # Found when the dataset is opened (before training), not by a worker at the first evaluation.
    with pytest.raises(data.DatasetNotFoundError, match="ArrayRecord file .*00001-of-00002 of split 'validation'"):
        data.get_dataset_info(name, str(tmp_path))


def test_batch_errors(fake_tfds):
    name, data_dir = fake_tfds
    with pytest.raises(ValueError, match="not divisible"):
        data.train_batches(name, data_dir=data_dir, global_batch_size=10, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="larger than"):
        data.train_batches(name, data_dir=data_dir, global_batch_size=64, **LOCAL)
    with pytest.raises(ValueError, match="augment"):
        data.train_batches(name, data_dir=data_dir, global_batch_size=8, augment="mixup", **LOCAL)


def test_dead_worker_stops_the_run_with_its_error(fake_tfds):
    name, data_dir = fake_tfds
    it = data.train_batches(name, data_dir=data_dir, global_batch_size=4, image_size=8, num_workers=2, **LOCAL)
    next(it)
    workers = [p for p in multiprocessing.active_children() if "grain" in p.name]
    assert len(workers) == 2
    os.kill(workers[0].pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(data.InputWorkerError, match="exit code -9"):
        for _ in range(100):
            next(it)
    assert time.monotonic() - start < 30  # An error, not a hang.
    it.close()


def test_corrupt_image_error_finder(tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(testing.encode_image(testing.coordinate_image(4, 4), "PNG"))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0garbage")
    assert datasets_lib.find_corrupt_image([str(good)]) is None
    err = datasets_lib.find_corrupt_image([str(good), str(bad)])
    assert isinstance(err, data.CorruptImageError) and err.path == str(bad)


def test_pipelines_run_where_tensorflow_cannot_be_imported(tmp_path):
    """gg_jax.data (TFDS ArrayRecord, image folder, digits, worker processes) and gg_jax.summary
    with a `tensorflow` package on the path that raises ImportError."""
    code = (
        "import sys\n"
        "try:\n    import tensorflow\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit('not blocked')\n"
        "from gg_jax import data, summary\n"
        "from gg_jax.data import testing\n"
        f"root = {str(tmp_path)!r}\n"
        "if __name__ == '__main__':\n"
        "    with testing.mock_tfds('imagenet2012', root, image_size=(40, 50), train=16, validation=5):\n"
        "        b = next(data.create_train_iterator('imagenet2012', data_dir=root, global_batch_size=8,\n"
        "                                            image_size=16, num_workers=2))\n"
        "        assert b['image'].shape == (8, 16, 16, 3)\n"
        "        ev = list(data.create_eval_iterator('imagenet2012', data_dir=root, global_batch_size=4,\n"
        "                                            image_size=16, resize_size=20, num_workers=0))\n"
        "        assert sum(int(x['mask'].sum()) for x in ev) == 5\n"
        "    testing.write_image_folder(root + '/folder')\n"
        "    next(data.create_train_iterator('image_folder', data_dir=root + '/folder', global_batch_size=4,\n"
        "                                    image_size=16, num_workers=0))\n"
        "    next(data.create_train_iterator('digits', global_batch_size=8, image_size=8))\n"
        "    w = summary.create_writer(root + '/logs')\n"
        "    w.write_scalars(1, {'loss': 1.0}); w.close()\n"
        "    assert not [m for m in sys.modules if m == 'tensorflow' or m.startswith('tensorflow.')], 'tf'\n"
        "    print('OK')\n"
    )
    env = runs.without_tensorflow(runs.subprocess_env(tmp_path), tmp_path)
    proc = runs.run(["-c", code], env, check=False)
    assert proc.returncode == 0 and "OK" in proc.stdout, runs.tail(proc)
