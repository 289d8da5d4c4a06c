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
`config.head_lr_modules` (fast-MPN-COV's fine-grained recipe: the classifier `fc`) that factor
times the learning rate of the backbone (fast-MPN-COV's `classifier_factor`), and
`config.freeze` (e.g. `("conv1", "bn1", "layer1")`, fast-MPN-COV's `--freezed-layer`) leaves
the parameters of those modules untouched (no update, no weight decay), by
`optax.multi_transform` over such SGD chains, each with its learning rate in its state
(`optax.inject_hyperparams`). BatchNorm running statistics of frozen modules keep updating in
training mode, as in PyTorch, where `requires_grad=False` stops only the parameters.
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


def matches(module: str, patterns: Sequence[str]) -> bool:
    """Whether top-level module `module` is one of `patterns`, or numbered under one (`layer1`
    names `layer1_0`, `layer1_1`, ...: the reference's `layer1` Sequential)."""
    return any(module == p or module.startswith(f"{p}_") for p in patterns)


def param_groups(params, head_modules: Sequence[str] = (), frozen: Sequence[str] = ()):
    """The tree of `params` labelled for `optax.multi_transform`: 'frozen' under a top-level
    module of `frozen`, 'head' under one of `head_modules`, 'backbone' elsewhere."""
    flat = traverse_util.flatten_dict(params)

    def label(path):
        if matches(path[0], frozen):
            return "frozen"
        return "head" if matches(path[0], head_modules) else "backbone"

    return traverse_util.unflatten_dict({k: label(k) for k in flat})


def create_grouped_optimizer(
    learning_rate,
    head_lr_factor: float = 1.0,
    head_modules: Sequence[str] = (),
    *,
    frozen: Sequence[str] = (),
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    nesterov: bool = False,
) -> optax.GradientTransformation:
    """`create_optimizer` by groups of parameters (`param_groups`): `head_lr_factor` times the
    learning rate for `head_modules`; no update at all, weight decay included, for `frozen`.

    Each trained group is the same PyTorch-style SGD, with its learning rate (a schedule or a
    number) recorded in its state: `opt_state.inner_states['head'].inner_state[1]
    .hyperparams['learning_rate']`. Frozen parameters get `optax.set_to_zero()` (PyTorch's
    `requires_grad=False`: no gradient, so SGD skips them).
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
    groups = {"backbone": sgd(learning_rate), "head": sgd(head_lr), "frozen": optax.set_to_zero()}
    return optax.multi_transform(groups, lambda params: param_groups(params, tuple(head_modules), tuple(frozen)))


def create(config, *, steps_per_epoch: int, num_train_steps: int):
    """`(optimizer, learning-rate schedule)` of a training config.

    Reads `learning_rate` (for a batch of 256), `batch_size`, `lr_schedule`,
    `lr_boundaries_epochs`, `lr_decay_factor`, `warmup_epochs`, `momentum`, `nesterov`,
    `weight_decay`, `head_lr_factor`, `head_lr_modules` and `freeze` (see configs/default.py).
    The schedule is the backbone's.
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
    if groups is None:  # one group: the state of runs without the options is unchanged
        return create_optimizer(schedule, **sgd), schedule
    return (
        create_grouped_optimizer(
            schedule,
            groups.get("head_lr_factor", 1.0),
            groups.get("head_lr_modules", ()),
            frozen=groups.get("freeze", ()),
            **sgd,
        ),
        schedule,
    )


def lr_groups(config) -> dict | None:
    """The parameter groups of a config (None: one learning rate for every parameter), as
    checkpoints record them: the optimizer state's structure depends on them."""
    groups = {}
    if float(config.head_lr_factor) != 1.0:
        groups.update(head_lr_factor=float(config.head_lr_factor), head_lr_modules=list(config.head_lr_modules))
    if config.freeze:
        groups["freeze"] = list(config.freeze)
    return groups or None
