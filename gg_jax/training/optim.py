"""Learning-rate schedule and optimizer of the reference recipe (PyTorch SGD, weight decay).

The reference trains with `torch.optim.SGD(params, lr, momentum=0.9, weight_decay=1e-4)`
on every parameter (BatchNorm scales and biases too). PyTorch's update is

    g = grad + wd * p;   buf = momentum * buf + g   (buf = g at the first step);   p -= lr * buf

`optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum))` computes exactly
this: `add_decayed_weights` adds `wd * p` to the gradient *before* the momentum trace
(`optax.trace` starts from zeros, so its first value is `g`), and the learning rate
scales the trace afterwards. Decoupled decay (AdamW style, decay after the momentum)
would not match. `tests/test_training_unit.py` checks this against `torch.optim.SGD`.

Learning rate: `config.learning_rate` is the rate for a global batch of 256 and is
scaled linearly with the batch (Goyal et al., 2017): lr = learning_rate * batch_size / 256.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import optax

from gg_jax.training.validation import LR_SCHEDULES as SCHEDULES

REFERENCE_BATCH_SIZE = 256


def scaled_learning_rate(base_learning_rate: float, batch_size: int) -> float:
    """`base_learning_rate` is for a batch of 256; linear scaling to `batch_size`."""
    return base_learning_rate * batch_size / REFERENCE_BATCH_SIZE


def create_learning_rate_schedule(
    *,
    base_learning_rate: float,
    batch_size: int,
    steps_per_epoch: int,
    num_train_steps: int,
    schedule: str = "step",
    boundaries_epochs: Sequence[float] = (30, 60, 90),
    decay_factor: float = 0.1,
    warmup_epochs: float = 0.0,
) -> Callable[[int], float]:
    """Learning rate per step.

    schedule:
      "step": the reference's: multiplied by `decay_factor` at each of `boundaries_epochs`
        (PyTorch's `lr * 0.1 ** (epoch // 30)` with boundaries 30, 60, 90).
      "cosine": cosine decay to 0 over `num_train_steps`.
      "constant": no decay.
    warmup_epochs: linear warmup from 0 over this many epochs first (0 = none, the reference).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown lr_schedule {schedule!r}; choose one of {SCHEDULES}.")
    peak = scaled_learning_rate(base_learning_rate, batch_size)
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    if schedule == "step":
        boundaries = [int(round(e * steps_per_epoch)) for e in boundaries_epochs]
        main = optax.piecewise_constant_schedule(
            peak, {b - warmup_steps: decay_factor for b in boundaries if b > warmup_steps}
        )
    elif schedule == "cosine":
        main = optax.cosine_decay_schedule(peak, max(num_train_steps - warmup_steps, 1))
    else:
        main = optax.constant_schedule(peak)
    if warmup_steps <= 0:
        return main
    warmup = optax.linear_schedule(0.0, peak, warmup_steps)
    return optax.join_schedules([warmup, main], [warmup_steps])


def create_optimizer(
    learning_rate, *, momentum: float = 0.9, weight_decay: float = 1e-4, nesterov: bool = False
) -> optax.GradientTransformation:
    """PyTorch-style SGD: weight decay added to the gradient of every parameter, then momentum."""
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(learning_rate, momentum=momentum if momentum else None, nesterov=nesterov),
    )


def create(config, *, steps_per_epoch: int, num_train_steps: int):
    """`(optimizer, learning-rate schedule)` of a training config.

    Reads `learning_rate` (for a batch of 256), `batch_size`, `lr_schedule`,
    `lr_boundaries_epochs`, `lr_decay_factor`, `warmup_epochs`, `momentum`, `nesterov` and
    `weight_decay` (see configs/default.py).
    """
    schedule = create_learning_rate_schedule(
        base_learning_rate=config.learning_rate,
        batch_size=config.batch_size,
        steps_per_epoch=steps_per_epoch,
        num_train_steps=num_train_steps,
        schedule=config.lr_schedule,
        boundaries_epochs=config.lr_boundaries_epochs,
        decay_factor=config.lr_decay_factor,
        warmup_epochs=config.warmup_epochs,
    )
    tx = create_optimizer(
        schedule, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=config.nesterov
    )
    return tx, schedule
