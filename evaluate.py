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
Exit status 1 on an error the user can fix, printed as one `error: ...` line on stderr.
"""

import json

from absl import flags, logging
from ml_collections import config_flags

# Only absl and ml_collections at module level: `--help` and flag errors are instant.
from gg_jax import cli
from gg_jax.training import distributed_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file naming the model and dataset.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Training workdir: its latest checkpoint, and where results are written."
)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint to evaluate instead of the workdir's latest.")
flags.mark_flags_as_required(["config"])
flags.adopt_module_key_flags(distributed_flags)


def main(argv):
    config = cli.config_value(_CONFIG, argv)
    if not (_WORKDIR.value or _CHECKPOINT.value):
        cli.fail("give --workdir (its latest checkpoint) or --checkpoint=PATH.")
    from gg_jax.cpu import malloc

    # On a CPU-only host, re-executes this command with huge pages for malloc (never on GPU/TPU).
    hugepages = malloc.tune_for_cpu_backend()
    from gg_jax.training import validation

    validation.check_eval_config(config)  # Before the devices are touched: stops at once.
    if _WORKDIR.value:
        validation.check_writable(_WORKDIR.value, hint=validation.EVAL_HINT, create=False)
    cli.start_devices()
    import jax

    from gg_jax.training import evaluation

    if hugepages:
        logging.info("malloc: transparent huge pages for XLA:CPU's buffers (gg_jax/cpu/malloc.py).")
    metrics = evaluation.evaluate(config, _WORKDIR.value, _CHECKPOINT.value)  # UserError: one line, exit 1.
    if jax.process_index() == 0:
        print(json.dumps(metrics, sort_keys=True), flush=True)


if __name__ == "__main__":
    cli.run(main)
