"""Throughput of the train input pipeline, in images per second per CPU core.

Generates ImageNet-like JPEGs (500x375 and 375x500, smooth random content with
texture, quality 90: about 85 KB each, close to ImageNet's average), then runs
`gg_jax.data.create_train_iterator` end to end (file or record read, JPEG
window decode, random-resized crop to 224, flip, normalisation, batching and
the global jax.Array assembly) with tf.data limited to 1, 2, ... threads.

Reported per configuration:
  images/s            wall-clock throughput of the whole iterator;
  images/s/thread     that divided by the tf.data thread count;
  images/CPU-s        images per second of CPU time used by the whole process
                      (all threads): the per-core cost, robust to other load.
Target: >= 300 images/s per core (a 16-core host then feeds > 4,000 images/s).

  python benchmarks/bench_input.py                       # table
  python benchmarks/bench_input.py --json bench_input.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gg_jax import data  # noqa: E402
from gg_jax.data import testing  # noqa: E402

TARGET_PER_CORE = 300


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_jpegs(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = (375, 500) if i % 3 else (500, 375)
        out.append(testing.encode_image(testing.random_photo(rng, h, w), "JPEG", quality=90))
    return out


def write_image_folder(root: str, jpegs: list[bytes], copies: int, num_classes: int = 16) -> int:
    """Writes the JPEGs under root/train/<class>/ and hard-links each `copies` times (long epochs)."""
    count = 0
    for i, blob in enumerate(jpegs):
        d = os.path.join(root, "train", f"class_{i % num_classes:02d}")
        os.makedirs(d, exist_ok=True)
        first = os.path.join(d, f"img_{i:05d}_0.jpg")
        with open(first, "wb") as f:
            f.write(blob)
        count += 1
        for c in range(1, copies):
            os.link(first, os.path.join(d, f"img_{i:05d}_{c}.jpg"))
            count += 1
    return count


def measure(name: str, data_dir: str, *, batch_size: int, threads: int, seconds: float, augment: str, cache) -> dict:
    it = data.create_train_iterator(
        name,
        data_dir=data_dir,
        global_batch_size=batch_size,
        image_size=224,
        augment=augment,
        num_threads=threads,
        cache=cache,
        shuffle_buffer=1024,
    )
    for _ in range(3):  # Warm up: pipeline start, autotuning, shuffle buffer.
        next(it)["image"].block_until_ready()
    n = 0
    t0, c0 = time.perf_counter(), _cpu_seconds()
    while time.perf_counter() - t0 < seconds or n < 5 * batch_size:
        next(it)["image"].block_until_ready()
        n += batch_size
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    return {
        "source": name,
        "augment": augment,
        "threads": threads,
        "batch_size": batch_size,
        "images": n,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "images_per_s": round(n / wall, 1),
        "images_per_s_per_thread": round(n / wall / threads, 1),
        "images_per_cpu_s": round(n / cpu, 1),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=256, help="distinct JPEGs to generate")
    parser.add_argument("--copies", type=int, default=64, help="image-folder entries per JPEG (hard links)")
    parser.add_argument("--tfds-records", type=int, default=4096, help="records of the TFDS variant (0: skip)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", default=None, help="comma-separated tf.data thread counts (default 1,NCPU)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measurement time per configuration")
    parser.add_argument("--augment", default="inception_crop", choices=["inception_crop", "scale_aug"])
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    ncpu = os.cpu_count() or 1
    threads = sorted({int(t) for t in args.threads.split(",")}) if args.threads else sorted({1, ncpu})
    jpegs = make_jpegs(args.num_images)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "folder")
        entries = write_image_folder(folder, jpegs, args.copies)
        sources = [("image_folder", folder, None)]
        if args.tfds_records:
            tfds_dir = os.path.join(tmp, "tfds")
            name = testing.write_tfds_dataset(
                tfds_dir,
                name="gg_bench_images",
                num_classes=16,
                num_shards=8,
                encoded_images=jpegs,
                train=args.tfds_records,
                validation=16,
            )
            sources.append((name, tfds_dir, False))  # Streaming from tfrecords, as for ImageNet.
        for name, data_dir, cache in sources:
            for t in threads:
                r = measure(
                    name,
                    data_dir,
                    batch_size=args.batch_size,
                    threads=t,
                    seconds=args.seconds,
                    augment=args.augment,
                    cache=cache,
                )
                results.append(r)
                print(f"  measured {name} threads={t}: {r['images_per_s']} images/s", file=sys.stderr)

    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    report = {
        "benchmark": "bench_input",
        "command": "python benchmarks/bench_input.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "cpu": _cpu_model(),
            "cpu_count": ncpu,
            "tensorflow": tf.__version__,
            "python": platform.python_version(),
        },
        "data": {
            "distinct_jpegs": len(jpegs),
            "mean_jpeg_bytes": int(np.mean([len(j) for j in jpegs])),
            "image_folder_entries": entries,
            "tfds_records": args.tfds_records,
            "sizes": "500x375 and 375x500",
        },
        "target_images_per_s_per_core": TARGET_PER_CORE,
        "results": results,
    }
    header = (
        f"{'source':<16}{'augment':<16}{'threads':>8}{'batch':>7}{'images/s':>11}{'img/s/thread':>14}{'img/CPU-s':>11}"
    )
    print(
        f"Train input pipeline, 224x224, {report['machine']['cpu']} ({ncpu} CPUs), "
        f"JPEGs ~{report['data']['mean_jpeg_bytes'] // 1000} KB"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['source']:<16}{r['augment']:<16}{r['threads']:>8}{r['batch_size']:>7}{r['images_per_s']:>11.1f}"
            f"{r['images_per_s_per_thread']:>14.1f}{r['images_per_cpu_s']:>11.1f}"
        )
    print(f"Target: >= {TARGET_PER_CORE} images/s per core.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
