"""The multi-host command-line flags shared by `train.py` and `evaluate.py`.

  --distributed                      jax.distributed.initialize() with cluster auto-detection
                                     (Cloud TPU, SLURM, Open MPI, Kubernetes);
  --coordinator_address=HOST:PORT --num_processes=N --process_id=I   explicit.

Importing this module defines the flags; `initialize()` must run before anything
touches the devices.
"""

from absl import flags

DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (one process per host).")
COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for jax.distributed.")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes, for jax.distributed.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, for jax.distributed.")


def initialize() -> None:
    """`jax.distributed.initialize(...)` as the flags ask (nothing without them)."""
    from gg_jax.training import trainer

    trainer.initialize_distributed(
        DISTRIBUTED.value,
        coordinator_address=COORDINATOR.value,
        num_processes=NUM_PROCESSES.value,
        process_id=PROCESS_ID.value,
    )
