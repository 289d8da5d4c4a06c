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

Fine-tuning: `config.head_lr_factor` != 1 gives the parameters under the top-level modules
`config.head_lr_modules` (default the pooling head and the classifier, `head` and `fc`)
that factor times the learning rate of the backbone (fast-MPN-COV's `classifier_factor`),
by `optax.multi_transform` over two such SGD chains, each with its learning rate in its
state (`optax.inject_hyperparams`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import optax
from flax import traverse_util

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


def param_groups(params, head_modules: Sequence[str]):
    """The tree of `params` with 'head' for the leaves under a top-level module in
    `head_modules`, 'backbone' for the others (labels of `optax.multi_transform`)."""
    flat = traverse_util.flatten_dict(params)
    labels = {k: "head" if k[0] in head_modules else "backbone" for k in flat}
    return traverse_util.unflatten_dict(labels)


def create_grouped_optimizer(
    learning_rate,
    head_lr_factor: float,
    head_modules: Sequence[str],
    *,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    nesterov: bool = False,
) -> optax.GradientTransformation:
    """`create_optimizer` with `head_lr_factor` times the learning rate for `head_modules`.

    Each group is the same PyTorch-style SGD, with its learning rate (a schedule or a
    number) recorded in its state: `opt_state.inner_states['head'].inner_state[1]
    .hyperparams['learning_rate']`.
    """

    def sgd(lr):
        return optax.chain(
            optax.add_decayed_weights(weight_decay),
            optax.inject_hyperparams(optax.sgd)(
                learning_rate=lr, momentum=momentum if momentum else None, nesterov=nesterov
            ),
        )

    head_lr = (
        (lambda step: head_lr_factor * learning_rate(step))
        if callable(learning_rate)
        else (head_lr_factor * learning_rate)
    )
    return optax.multi_transform(
        {"backbone": sgd(learning_rate), "head": sgd(head_lr)},
        lambda params: param_groups(params, tuple(head_modules)),
    )


def create(config, *, steps_per_epoch: int, num_train_steps: int):
    """`(optimizer, learning-rate schedule)` of a training config.

    Reads `learning_rate` (for a batch of 256), `batch_size`, `lr_schedule`,
    `lr_boundaries_epochs`, `lr_decay_factor`, `warmup_epochs`, `momentum`, `nesterov`,
    `weight_decay`, `head_lr_factor` and `head_lr_modules` (see configs/default.py). The
    schedule is the backbone's.
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
    sgd = dict(momentum=config.momentum, weight_decay=config.weight_decay, nesterov=config.nesterov)
    groups = lr_groups(config)
    if groups is None:  # one group: the state of runs without the option is unchanged
        return create_optimizer(schedule, **sgd), schedule
    return create_grouped_optimizer(schedule, groups["head_lr_factor"], groups["head_lr_modules"], **sgd), schedule


def lr_groups(config) -> dict | None:
    """The learning-rate groups of a config (None: one learning rate), as checkpoints record them:
    the optimizer state's structure depends on them."""
    if float(config.head_lr_factor) == 1.0:
        return None
    return {"head_lr_factor": float(config.head_lr_factor), "head_lr_modules": list(config.head_lr_modules)}
