"""Input pipeline throughput: the Grain pipeline against the former tf.data pipeline, same JPEGs, one run.

Generates ImageNet-like JPEGs (500x375, 375x500, 500x333, 333x500; smooth random
content with texture, quality 90: about 85 KB each, close to ImageNet's average) and
runs, for the train transform (random-resized crop to 224 + flip) and the eval
transform (shorter side to 256 + centre crop 224), each pipeline end to end to
normalised float32 global `jax.Array` batches:

  grain    `gg_jax.data.create_train_iterator` / `create_eval_iterator` with
           `num_workers` worker processes, from the JPEGs in memory, and (train)
           from the same JPEGs as TFDS ArrayRecord records (`tfds_arrayrecord`);
  tf.data  a compact copy of the pipeline this project used before (JPEG window
           decode with `tf.image.decode_and_crop_jpeg`, bilinear resize without
           antialiasing, flip; eval: antialiased resize + centre crop; normalised in
           tf.data), with a private thread pool of the same size, from the JPEGs in
           memory. Skipped, with a note, where TensorFlow is not installed.

Reported per row: images/s (wall clock) and images per CPU-second (CPU time of this
process and of its worker processes during the measurement: the per-core cost,
robust to other load on the machine), and the ratio of the latter to tf.data's.

  python -m benchmarks.bench_input                  # 2 workers / threads, table
  python -m benchmarks.bench_input --workers 4 --rounds 6 --json bench_input.json

Rows of one transform are measured in interleaved rounds (each for --seconds in turn),
so that other load on the machine weighs on them alike.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import sys
import tempfile
import time

import numpy as np

from benchmarks.table import print_table
from gg_jax import data
from gg_jax.data import sources, testing

SIZES = ((375, 500), (500, 375), (333, 500), (500, 333))
IMAGE_SIZE, RESIZE_SIZE = 224, 256


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _children_cpu_seconds() -> float:
    """User + system CPU seconds of the live child processes (the Grain workers), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for child in multiprocessing.active_children():
        try:
            with open(f"/proc/{child.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime + _children_cpu_seconds()


def make_jpegs(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [
        testing.encode_image(testing.random_photo(rng, *SIZES[i % len(SIZES)]), "JPEG", quality=90) for i in range(n)
    ]


def memory_source(jpegs: list[bytes], num_examples: int) -> sources.Source:
    """The JPEGs as an in-memory dataset of `num_examples` examples (example i = JPEG i % n)."""
    payload = np.asarray([jpegs[i % len(jpegs)] for i in range(num_examples)], dtype=object)
    labels = np.arange(num_examples, dtype=np.int32) % 16
    info = sources.DatasetInfo("bench_jpegs", 16, num_examples, num_examples, "train", "validation")
    return sources.ArraySource(info, {"train": ("bytes", payload, labels), "validation": ("bytes", payload, labels)})


# --------------------------------------------------------------- tf.data reference


def tf_pipeline(jpegs: list[bytes], *, train: bool, batch_size: int, threads: int, seed: int = 0):
    """The former tf.data pipeline (gg_jax.data before Grain), compacted: NumPy batches."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    tf.config.set_visible_devices([], "GPU")
    mean = tf.constant([255.0 * m for m in data.MEAN_RGB], tf.float32)
    inv_std = tf.constant([1.0 / (255.0 * s) for s in data.STDDEV_RGB], tf.float32)

    def inception_crop(image, key):
        crop_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
        shape = tf.image.extract_jpeg_shape(image)
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            shape,
            bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
            seed=crop_key,
            min_object_covered=0.08,
            aspect_ratio_range=(3 / 4, 4 / 3),
            area_range=(0.08, 1.0),
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        window = tf.stack([begin[0], begin[1], size[0], size[1]])
        crop = tf.image.decode_and_crop_jpeg(image, window, channels=3)
        out = tf.image.resize(crop, [IMAGE_SIZE, IMAGE_SIZE], method="bilinear", antialias=False)
        return tf.image.stateless_random_flip_left_right(out, flip_key)

    def eval_crop(image):
        decoded = tf.io.decode_jpeg(image, channels=3)
        shape = tf.cast(tf.shape(decoded)[:2], tf.float64)
        short = tf.minimum(shape[0], shape[1])
        new = tf.cast(tf.floor(RESIZE_SIZE * shape / short), tf.int32)
        resized = tf.image.resize(decoded, new, method="bilinear", antialias=True)
        top = (new[0] - IMAGE_SIZE + 1) // 2
        left = (new[1] - IMAGE_SIZE + 1) // 2
        return tf.slice(resized, [top, left, 0], [IMAGE_SIZE, IMAGE_SIZE, 3])

    key = tf.constant([seed, 12345], tf.int64)

    def prepare(position, image):
        pixels = inception_crop(image, tf.random.experimental.stateless_fold_in(key, position)) if train else None
        pixels = eval_crop(image) if not train else pixels
        return {"image": (pixels - mean) * inv_std, "label": tf.cast(position % 16, tf.int32)}

    ds = tf.data.Dataset.from_tensor_slices(jpegs).repeat().enumerate()
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    options.threading.max_intra_op_parallelism = 1
    options.threading.private_threadpool_size = threads
    return ds.with_options(options).as_numpy_iterator()


class _TfGlobal:
    """tf.data NumPy batches -> global jax.Arrays, as the former pipeline's prefetcher."""

    def __init__(self, local, batch_size):
        import jax  # pylint: disable=g-import-not-at-top

        from gg_jax import sharding  # pylint: disable=g-import-not-at-top

        mesh = sharding.make_mesh()
        self._sharding = sharding.batch_sharding(mesh)
        self._local, self._batch_size, self._jax = local, batch_size, jax

    def __next__(self):
        batch = next(self._local)
        return {
            k: self._jax.make_array_from_process_local_data(self._sharding, v, (self._batch_size,) + v.shape[1:])
            for k, v in batch.items()
        }

    def close(self):
        pass


# ---------------------------------------------------------------------- measuring


def measure(iterators: dict, *, batch_size: int, seconds: float, rounds: int) -> dict:
    """{key: totals} over `rounds` rounds that measure each iterator for `seconds` in turn, so that
    a change of load on the machine affects every row alike."""
    for it in iterators.values():
        for _ in range(3):  # Warm up: worker start, autotuning, compilation.
            next(it)["image"].block_until_ready()
    totals = {key: {"images": 0, "wall_s": 0.0, "cpu_s": 0.0} for key in iterators}
    for _ in range(rounds):
        for key, it in iterators.items():
            n = 0
            t0, c0 = time.perf_counter(), _cpu_seconds()
            while time.perf_counter() - t0 < seconds or n < 3 * batch_size:
                next(it)["image"].block_until_ready()
                n += batch_size
            totals[key]["images"] += n
            totals[key]["wall_s"] += time.perf_counter() - t0
            totals[key]["cpu_s"] += _cpu_seconds() - c0
    for it in iterators.values():
        it.close()
    for t in totals.values():
        t["images_per_s"] = round(t["images"] / t["wall_s"], 1)
        t["images_per_cpu_s"] = round(t["images"] / t["cpu_s"], 1)
        t["wall_s"], t["cpu_s"] = round(t["wall_s"], 2), round(t["cpu_s"], 2)
    return totals


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=256, help="distinct JPEGs to generate")
    parser.add_argument("--examples", type=int, default=8192, help="examples per split (JPEG i %% num-images)")
    parser.add_argument(
        "--eval-examples",
        type=int,
        default=32768,
        help="examples of the eval source (read once: enough for every round)",
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="Grain worker processes = tf.data threads")
    parser.add_argument("--seconds", type=float, default=5.0, help="measurement time per row and round")
    parser.add_argument("--rounds", type=int, default=4, help="rounds over the rows (interleaved)")
    parser.add_argument("--no-arrayrecord", action="store_true", help="skip the TFDS ArrayRecord row")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    try:
        import tensorflow as tf  # pylint: disable=g-import-not-at-top

        tf_version = tf.__version__
    except ImportError:
        tf_version = None
    jpegs = make_jpegs(args.num_images)
    source = memory_source(jpegs, args.examples)
    rows = []
    common = dict(global_batch_size=args.batch_size, image_size=IMAGE_SIZE, num_workers=args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        plans = []
        for transform in ("train", "eval"):
            if tf_version:
                plans.append(
                    (
                        "tf.data",
                        transform,
                        "memory",
                        lambda t=transform: _TfGlobal(
                            tf_pipeline(jpegs, train=t == "train", batch_size=args.batch_size, threads=args.workers),
                            args.batch_size,
                        ),
                    )
                )
            if transform == "train":
                plans.append(("grain", transform, "memory", lambda: data.create_train_iterator(source, **common)))
                if not args.no_arrayrecord:
                    name = testing.write_tfds_dataset(
                        tmp,
                        name="gg_bench_images",
                        num_classes=16,
                        num_shards=8,
                        encoded_images=jpegs,
                        train=args.examples,
                        validation=16,
                    )
                    plans.append(
                        (
                            "grain",
                            transform,
                            "tfds_arrayrecord",
                            lambda n=name: data.create_train_iterator(n, data_dir=tmp, **common),
                        )
                    )
            else:
                plans.append(
                    (
                        "grain",
                        transform,
                        "memory",
                        lambda: data.create_eval_iterator(
                            memory_source(jpegs, args.eval_examples), resize_size=RESIZE_SIZE, **common
                        ),
                    )
                )
        for transform in ("train", "eval"):  # One transform at a time: fewer idle workers around.
            chosen = [p for p in plans if p[1] == transform]
            iterators = {(p, t, src): make() for p, t, src, make in chosen}
            totals = measure(iterators, batch_size=args.batch_size, seconds=args.seconds, rounds=args.rounds)
            for (pipeline, t, src), r in totals.items():
                rows.append({"pipeline": pipeline, "transform": t, "source": src, "workers": args.workers, **r})
                print(f"  measured {pipeline} {t} {src}: {r['images_per_cpu_s']} images/CPU-s", file=sys.stderr)

    ref = {r["transform"]: r["images_per_cpu_s"] for r in rows if r["pipeline"] == "tf.data"}
    for r in rows:
        r["ratio_vs_tf_data"] = round(r["images_per_cpu_s"] / ref[r["transform"]], 3) if r["transform"] in ref else None
    import grain  # pylint: disable=g-import-not-at-top

    report = {
        "benchmark": "bench_input",
        "command": "python -m benchmarks.bench_input " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "grain": grain.__version__,
            "tensorflow": tf_version,
        },
        "data": {
            "distinct_jpegs": len(jpegs),
            "mean_jpeg_bytes": int(np.mean([len(j) for j in jpegs])),
            "sizes": ", ".join(f"{w}x{h}" for h, w in SIZES),
            "batch_size": args.batch_size,
        },
        "results": rows,
    }
    print(
        f"Input pipelines to normalised 224x224 float32 jax.Arrays, {report['machine']['cpu']} "
        f"({report['machine']['cpu_count']} CPUs), JPEGs ~{report['data']['mean_jpeg_bytes'] // 1000} KB, "
        f"batch {args.batch_size}"
    )
    shown = [{**r, "vs_tf_data": "-" if r["ratio_vs_tf_data"] is None else r["ratio_vs_tf_data"]} for r in rows]
    columns = "pipeline transform source workers images wall_s cpu_s images_per_s images_per_cpu_s vs_tf_data"
    formats = dict(wall_s=".1f", cpu_s=".1f", images_per_s=".1f", images_per_cpu_s=".1f", vs_tf_data=".2f")
    print_table(shown, columns, **formats)
    if not tf_version:
        print("tf.data: not measured (TensorFlow is not installed; pip install tensorflow-cpu for that column).")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
