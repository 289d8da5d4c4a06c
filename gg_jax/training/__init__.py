"""Training and evaluation of any `gg_jax.models` model, driven by an ml_collections config.

  trainer.py        train_and_evaluate(config, workdir): the train loop
  evaluation.py     the eval loop, and evaluate(config, workdir, checkpoint) of evaluate.py
  state.py          TrainState, the model of a config, initialisation
  init_from.py      fine-tuning's start from a checkpoint (config.init_from)
  optim.py          learning-rate schedule; PyTorch-style SGD + momentum + weight decay
  steps.py          train/eval steps, jitted with explicit shardings over a device mesh
  progress.py       train metrics between log steps, the progress line and its ETA
  preemption.py     SIGTERM / Ctrl-C -> save, wait for the commit, exit
  validation.py     checks of a config and a workdir before anything is read or written
  logs.py           the library logs a user cannot act on, left out
  distributed_flags.py  the multi-host flags of train.py and evaluate.py (absl only)
Checkpoints are `gg_jax.checkpoints`; the command line is `gg_jax.cli`. Entry points:
`train.py` and `evaluate.py` at the repository root. The names below are imported on first
use, so that the entry points' flag modules (and `--help`) do not load the trainer.
"""

import importlib

_EXPORTS = {
    "ConfigError": "gg_jax.training.validation",
    "NonFiniteLossError": "gg_jax.training.trainer",
    "TrainResult": "gg_jax.training.trainer",
    "TrainState": "gg_jax.training.state",
    "evaluate": "gg_jax.training.evaluation",
    "train_and_evaluate": "gg_jax.training.trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
