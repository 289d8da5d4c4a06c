"""Training and evaluation of any `gg_jax.models` model, driven by an ml_collections config.

  validation.py     checks of a config and a workdir that need no devices (no jax import)
  optim.py          learning-rate schedule; PyTorch-style SGD + momentum + weight decay
  state.py          TrainState, model from config, initialisation, fine-tuning init
  steps.py          train/eval steps, jitted with explicit shardings over a device mesh
  checkpointing.py  Orbax checkpoints in WORKDIR/checkpoints (async, atomic, reshardable)
  preemption.py     SIGTERM -> save, wait for the commit, exit
  trainer.py        train_and_evaluate(config, workdir), evaluate(config, workdir, checkpoint)
  cli.py, distributed_flags.py   what train.py and evaluate.py share (absl only)

Entry points: `train.py` and `evaluate.py` at the repository root. The names below are
imported on first use, so that the entry points' flag modules (and `--help`) do not load
the trainer (jax, TensorFlow, Orbax).
"""

import importlib

_EXPORTS = {
    "ConfigError": "gg_jax.training.validation",
    "NonFiniteLossError": "gg_jax.training.trainer",
    "TrainResult": "gg_jax.training.trainer",
    "TrainState": "gg_jax.training.state",
    "WorkdirMismatchError": "gg_jax.training.checkpointing",
    "evaluate": "gg_jax.training.trainer",
    "train_and_evaluate": "gg_jax.training.trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
