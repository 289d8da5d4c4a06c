"""Training and evaluation of any `gg_jax.models` model, driven by an ml_collections config.

  optim.py          learning-rate schedule; PyTorch-style SGD + momentum + weight decay
  state.py          TrainState, model from config, initialisation, fine-tuning init
  steps.py          train/eval steps, jitted with explicit shardings over a device mesh
  checkpointing.py  Orbax checkpoints in WORKDIR/checkpoints (async, atomic, reshardable)
  preemption.py     SIGTERM -> save and exit
  trainer.py        train_and_evaluate(config, workdir), evaluate(config, workdir, checkpoint)

Entry points: `train.py` and `evaluate.py` at the repository root.
"""

from gg_jax.training.checkpointing import WorkdirMismatchError
from gg_jax.training.state import TrainState
from gg_jax.training.trainer import ConfigError, NonFiniteLossError, TrainResult, evaluate, train_and_evaluate

__all__ = [
    "ConfigError",
    "NonFiniteLossError",
    "TrainResult",
    "TrainState",
    "WorkdirMismatchError",
    "evaluate",
    "train_and_evaluate",
]
