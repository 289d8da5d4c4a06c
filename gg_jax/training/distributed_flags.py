"""The multi-host command-line flags shared by `train.py` and `evaluate.py`.

  --distributed                      jax.distributed.initialize() with cluster auto-detection
                                     (Cloud TPU, SLURM, Open MPI, Kubernetes);
  --coordinator_address=HOST:PORT --num_processes=N --process_id=I   explicit.

Importing this module defines the flags (and imports no jax); `initialize()` must run
before anything touches the devices.
"""

from __future__ import annotations

from absl import flags

DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (one process per host).")
COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for jax.distributed.")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes, for jax.distributed.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, for jax.distributed.")


def initialize_distributed(
    enabled: bool = False,
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """`jax.distributed.initialize(...)` when `enabled` or a coordinator address is given.

    Must run before anything touches the devices. With no arguments JAX detects the
    cluster (Cloud TPU, SLURM, Open MPI, Kubernetes). CPU collectives go through gloo,
    so several CPU-only processes (tests, CPU clusters) can run one sharded step; this
    does not affect GPU or TPU devices.
    """
    if not (enabled or coordinator_address):
        return
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )


def initialize() -> None:
    """`initialize_distributed` as the flags ask (nothing without them)."""
    initialize_distributed(
        DISTRIBUTED.value,
        coordinator_address=COORDINATOR.value,
        num_processes=NUM_PROCESSES.value,
        process_id=PROCESS_ID.value,
    )
