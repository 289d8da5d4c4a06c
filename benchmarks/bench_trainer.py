"""The whole trainer end to end: `train.py` on the synthetic source, its images/s beside the bare step's.

    python -m benchmarks.bench_trainer --workdir /tmp/e2e                      # resnet50_3g, bf16, batch 256
    python -m benchmarks.bench_trainer --workdir W --bare_json train_r50_3g_bf16.json --json trainer.json

Runs `python train.py --config=configs/imagenet_r50.py` on `dataset.name=synthetic` (ImageNet-shaped
JPEGs generated on the fly: decoding and augmentation included, no data on disk) for `--steps`
steps with one checkpoint and one evaluation, and reads the images per second of every log
interval from the run's log (`train/images_per_sec`, the rate between log steps with the
evaluation left out). `--bare_json` is `bench_train_step.py`'s JSON of the same model, dtype and
batch (what `benchmarks/gpu.sh` writes before this step): its images/s is the bare jitted step
on device-resident data, so the ratio is what the input pipeline, the metrics, checkpointing
and the loop cost. Prints a table; `--json` writes it.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time

from benchmarks.table import print_table

RATE = re.compile(r"\[(\d+)\] .*train/images_per_sec=([0-9.eE+-]+)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="the run's workdir (should be empty)")
    p.add_argument("--model", default="resnet50_3g")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--log_every", type=int, default=50)
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--bare_json", default="", help="bench_train_step.py's JSON with the bare step's images/s")
    p.add_argument("--json", default="")
    p.add_argument("--timeout", type=float, default=3600.0)
    return p.parse_args(argv)


def _bare_rate(path: str, model: str, dtype: str, batch_size: int) -> float | None:
    """The gg_jax images/s of `model`/`dtype`/`batch_size` in a bench_train_step.py JSON."""
    if not path:
        return None
    with open(path) as f:
        results = json.load(f)
    for row in results["rows"]:
        if (row["model"], row["dtype"], row["batch"]) == (model, dtype, batch_size) and row.get("gg_jax"):
            return row["gg_jax"]["images_per_sec"]
    return None


def main(args) -> dict:
    cmd = [
        sys.executable,
        "train.py",
        "--config=configs/imagenet_r50.py",
        f"--workdir={args.workdir}",
        f"--config.model.name={args.model}",
        f"--config.model.dtype={args.dtype}",
        f"--config.dataset.name={args.dataset}",
        f"--config.batch_size={args.batch_size}",
        f"--config.num_train_steps={args.steps}",
        f"--config.log_every_steps={args.log_every}",
        f"--config.checkpoint_every_steps={args.steps // 2}",  # one checkpoint mid-run, and the final one
        "--config.eval_every_steps=-1",  # one evaluation, at the end
    ]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"train.py exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    rates = {int(step): float(rate) for step, rate in RATE.findall(proc.stderr)}
    steady = [rate for step, rate in sorted(rates.items()) if step > args.log_every]  # after the first interval
    trainer = statistics.median(steady) if steady else None
    bare = _bare_rate(args.bare_json, args.model, args.dtype, args.batch_size)
    row = {
        "model": args.model,
        "dtype": args.dtype,
        "batch": args.batch_size,
        "steps": args.steps,
        "trainer_images_per_sec": trainer,
        "bare_step_images_per_sec": bare,
        "trainer_over_bare": trainer / bare if trainer and bare else None,
        "wall_s": wall,
    }
    print_table(
        [{k: ("-" if v is None else v) for k, v in row.items()}],
        "model dtype batch steps trainer_images_per_sec bare_step_images_per_sec trainer_over_bare wall_s",
        trainer_images_per_sec=".1f",
        bare_step_images_per_sec=".1f",
        trainer_over_bare=".3f",
        wall_s=".1f",
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(cmd), "intervals": rates, **row}, f, indent=2)
    return row


if __name__ == "__main__":
    main(parse_args())
