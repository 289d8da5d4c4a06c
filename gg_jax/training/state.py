"""The train state, the model built from a config, and its initialisation.

The trainer knows models only through `gg_jax.models.create(name, num_classes=..., dtype=...,
**options)` and the linen `init` / `apply` interface, so any registered model trains.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from gg_jax import cpu, models


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. `params` and `batch_stats` are the model's variables."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: optax.OptState

    @property
    def variables(self) -> dict[str, Any]:
        return {"params": self.params, "batch_stats": self.batch_stats}


def _all_model_options() -> frozenset:
    return frozenset(o for name in models.names() for o in models.head_options(name))


def model_options(model_config) -> dict[str, Any]:
    """`config.model` minus `name` and unset (None) placeholders: the **options of `create`.

    Options of other heads are dropped (with a log line), so that a baseline is a flag
    away from any config: `--config.model.name=resnet18_isqrt` on the demo config, which
    sets the 3G option `num_blocks`. Names that no model knows are kept, and `create`
    rejects them with the list of valid options.
    """
    items = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    options = {k: v for k, v in sorted(items.items()) if k != "name" and v is not None}
    try:
        valid = set(models.head_options(items["name"]))
    except ValueError:  # Unknown model name: `create` says so.
        return options
    ignored = sorted(k for k in options if k not in valid and k in _all_model_options())
    if ignored:
        logging.info("Ignoring config.model options %s: %s does not take them.", ignored, items["name"])
    return {k: v for k, v in options.items() if k not in ignored}


def create_model(model_config, num_classes: int, half_precision: bool = False):
    """The linen module named by `config.model.name`, with the options under `config.model`.

    Half precision: bfloat16 compute; parameters (and the covariance head) stay float32.
    """
    dtype = jnp.bfloat16 if half_precision else jnp.float32
    return models.create(model_config.name, num_classes=num_classes, dtype=dtype, **model_options(model_config))


def _init_variables(model, rng, image_size: int):
    variables = model.init(rng, jnp.zeros((1, image_size, image_size, 3), jnp.float32), train=False)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def _fresh_state(model, tx, rng, image_size: int) -> TrainState:
    variables = _init_variables(model, rng, image_size)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
    )


def create_train_state(model, tx, *, rng, image_size: int, sharding=None) -> TrainState:
    """A fresh state (step 0), computed by one jitted function placed with `sharding`.

    `sharding` is a pytree of shardings like the state (`gg_jax.sharding.replicated_tree`); on
    several hosts every process computes the same values, so the result is one global
    replicated array per leaf.
    """
    init = functools.partial(_fresh_state, model, tx, image_size=image_size)
    # A one-off program: compiled with the platform's options for those (gg_jax.cpu).
    options = cpu.init_compiler_options(jax.default_backend())
    return jax.jit(init, out_shardings=sharding, compiler_options=options)(rng)


def abstract_train_state(model, tx, *, image_size: int) -> TrainState:
    """Shapes and dtypes of the state, without computing anything."""
    return jax.eval_shape(functools.partial(_fresh_state, model, tx, image_size=image_size), jax.random.PRNGKey(0))


def abstract_variables(model, *, image_size: int):
    return jax.eval_shape(lambda rng: _init_variables(model, rng, image_size), jax.random.PRNGKey(0))
