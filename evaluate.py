"""Top-1 / top-5 error over the whole validation split, one crop or ten crops.

  python evaluate.py --config=configs/imagenet_r50.py --workdir=DIR              # latest checkpoint of a run
  python evaluate.py --config=configs/imagenet_r50.py --checkpoint=DIR/checkpoints/450000
  python evaluate.py --config=configs/places365_r50.py --checkpoint=/data/r50_3g_places  # converted weights
  python evaluate.py --config=configs/imagenet_r50.py --pretrained=resnet50_3g_imagenet  # released weights

--checkpoint may be a training workdir, one of its checkpoints/<step> directories, or a
variables directory written by `python -m gg_jax.convert ... --out DIR`. The config names
the model (--config.model.name and options must match the checkpoint) and the dataset;
ten crops: --config.eval.ten_crop=True (the Places365 configs set it). --pretrained=NAME
evaluates a released checkpoint (`python -m gg_jax.pretrained list`), downloaded and converted
on first use (or from a file downloaded by hand: --from_file=PATH), and adds its published
error beside the measured one. The result is printed as one JSON line: top1_error, top5_error
(fractions), loss, num_examples, step (and published_top1_error, published_top5_error,
published_protocol, published_source); with --workdir it is also written to its TensorBoard
summaries (eval/top1_error, ...).
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
_PRETRAINED = flags.DEFINE_string(
    "pretrained", None, "A released checkpoint to evaluate (python -m gg_jax.pretrained list), fetched if needed."
)
_FROM_FILE = flags.DEFINE_string(
    "from_file", None, "With --pretrained: its file, downloaded by hand (Baidu Pan, offline), verified and converted."
)
flags.mark_flags_as_required(["config"])
flags.adopt_module_key_flags(distributed_flags)


def main(argv):
    config = cli.config_value(_CONFIG, argv)
    if _PRETRAINED.value and _CHECKPOINT.value:
        cli.fail("give --checkpoint=PATH or --pretrained=NAME, not both.")
    if _FROM_FILE.value and not _PRETRAINED.value:
        cli.fail("--from_file needs --pretrained=NAME (the registry entry the file is for).")
    if not (_WORKDIR.value or _CHECKPOINT.value or _PRETRAINED.value):
        cli.fail("give --workdir (its latest checkpoint), --checkpoint=PATH or --pretrained=NAME.")
    from gg_jax.cpu import malloc

    # On a CPU-only host, re-executes this command with huge pages for malloc (never on GPU/TPU).
    hugepages = malloc.tune_for_cpu_backend()
    from gg_jax.training import validation

    validation.check_eval_config(config)  # Before the devices are touched: stops at once.
    checkpoint = _CHECKPOINT.value
    if _PRETRAINED.value:
        from gg_jax import pretrained

        pretrained.entry(_PRETRAINED.value)  # An unknown name stops here too.
        checkpoint = pretrained.PREFIX + _PRETRAINED.value
    if _WORKDIR.value:
        validation.check_writable(_WORKDIR.value, hint=validation.EVAL_HINT, create=False)
    cli.start_devices()
    import jax

    from gg_jax.training import evaluation

    if hugepages:
        logging.info("malloc: transparent huge pages for XLA:CPU's buffers (gg_jax/cpu/malloc.py).")
    if _FROM_FILE.value:
        pretrained.fetch(_PRETRAINED.value, from_file=_FROM_FILE.value)
    metrics = evaluation.evaluate(config, _WORKDIR.value, checkpoint)  # UserError: one line, exit 1.
    if jax.process_index() == 0:
        print(json.dumps(metrics, sort_keys=True), flush=True)


if __name__ == "__main__":
    cli.run(main)
