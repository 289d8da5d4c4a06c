"""Top-1 / top-5 error over the whole validation split, one crop or ten crops.

  python evaluate.py --config=configs/imagenet_r50.py --workdir=DIR              # latest checkpoint of a run
  python evaluate.py --config=configs/imagenet_r50.py --checkpoint=DIR/checkpoints/450000
  python evaluate.py --config=configs/places365_r50.py --checkpoint=/data/r50_3g_places  # converted weights

--checkpoint may be a training workdir, one of its checkpoints/<step> directories, or a
variables directory written by `python -m gg_jax.convert ... --out DIR`. The config names
the model (--config.model.name and options must match the checkpoint) and the dataset;
ten crops: --config.eval.ten_crop=True (the Places365 configs set it). The result is
printed as one JSON line: top1_error, top5_error (fractions), loss, num_examples, step;
with --workdir it is also written to its TensorBoard summaries (eval/top1_error, ...).
"""

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from gg_jax.training import distributed_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file naming the model and dataset.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Training workdir: its latest checkpoint, and where results are written."
)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint to evaluate instead of the workdir's latest.")
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not (_WORKDIR.value or _CHECKPOINT.value):
        raise app.UsageError("Give --workdir (its latest checkpoint) or --checkpoint=PATH.")
    from gg_jax.cpu import malloc

    # On a CPU-only host, re-executes this command with huge pages for malloc (never on GPU/TPU).
    hugepages = malloc.tune_for_cpu_backend()
    distributed_flags.initialize()  # Before anything touches the devices.
    import jax

    from gg_jax.training import trainer

    trainer.quiet_library_logs()
    if hugepages:
        logging.info("malloc: transparent huge pages for XLA:CPU's buffers (gg_jax/cpu/malloc.py).")
    try:
        metrics = trainer.evaluate(_CONFIG.value, _WORKDIR.value, _CHECKPOINT.value)
    except (*trainer.USER_ERRORS, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if jax.process_index() == 0:
        print(json.dumps(metrics, sort_keys=True), flush=True)


if __name__ == "__main__":
    app.run(main)
