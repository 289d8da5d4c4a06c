r"""Train a 3G-Net (or any gg_jax model) with an ml_collections config.

  python train.py --config=configs/demo.py --workdir=/tmp/gg_demo
  python train.py --config=configs/imagenet_r50.py --workdir=gs://bucket/r50 \
      --config.dataset.data_dir=gs://bucket/data --config.batch_size=1024 --config.model.dtype=bfloat16

Every config field can be overridden with --config.FIELD=VALUE. Rerunning the same
command in the same workdir resumes from the latest checkpoint (a finished run does not
train again). On several hosts, run the same command on every host with --distributed
(cluster auto-detection: Cloud TPU, SLURM, Open MPI, Kubernetes) or with
--coordinator_address/--num_processes/--process_id. See docs/training.md.

Exit status: 0 when the run is finished; 143 (128 + SIGTERM, a preemption notice) or 130
(128 + SIGINT, Ctrl-C) when it stopped after saving (and committing) the checkpoint of the
current step, from which the same command resumes (a second signal meanwhile is ignored);
1 on an error the user can fix (config, dataset, workdir, a checkpoint that cannot be read
or saved, a diverged run), printed as one `error: ...` line on stderr.
"""

import sys

from absl import flags, logging
from ml_collections import config_flags

# Only absl and ml_collections at module level: `--help` and flag errors are instant.
from gg_jax import cli
from gg_jax.training import distributed_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (e.g. configs/demo.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and TensorBoard summaries (local or gs://).")
flags.mark_flags_as_required(["config", "workdir"])
flags.adopt_module_key_flags(distributed_flags)


def main(argv):
    config = cli.config_value(_CONFIG, argv)
    from gg_jax.cpu import malloc

    # On a CPU-only host, re-executes this command with huge pages for malloc (never on GPU/TPU).
    hugepages = malloc.tune_for_cpu_backend()
    from gg_jax.training import validation

    # Before the devices are touched and anything is read or written: a config or workdir
    # that cannot run stops at once.
    validation.check_train_config(config)
    validation.check_writable(_WORKDIR.value)
    cli.start_devices()
    import jax

    from gg_jax.training import trainer

    logging.info(
        "JAX process %d of %d, %d local devices of %d: %s%s",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices()[0].platform,
        "; malloc: transparent huge pages (gg_jax/cpu/malloc.py)" if hugepages else "",
    )
    result = trainer.train_and_evaluate(config, _WORKDIR.value)  # UserError: one line, exit 1 (cli.run).
    if result.stopped_by:
        # A scheduler must not take a stopped run for a finished one.
        sys.exit(128 + result.stopped_by)


if __name__ == "__main__":
    cli.run(main)
