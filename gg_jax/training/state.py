"""The train state and its initialisation.

The trainer knows models only through `gg_jax.models.create(**config.model, num_classes=...)`
and the linen `init` / `apply` interface, so any registered model trains.
"""

from __future__ import annotations

import functools
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


def create_model(model_config, num_classes: int):
    """The model of a config's `model` section: `models.create(**config.model, num_classes=...)`.
    None-valued fields take the model's defaults."""
    return models.create(**dict(model_config), num_classes=num_classes)


def _fresh_state(model, tx, rng) -> TrainState:
    variables = models.init_variables(model, rng)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
    )


def create_train_state(model, tx, *, rng, sharding=None) -> TrainState:
    """A fresh state (step 0), computed by one jitted function placed with `sharding`.

    `sharding` is a pytree of shardings like the state (`gg_jax.sharding.replicated_tree`); on
    several hosts every process computes the same values, so the result is one global
    replicated array per leaf.
    """
    init = functools.partial(_fresh_state, model, tx)
    # A one-off program: compiled with the platform's options for those (gg_jax.cpu).
    options = cpu.init_compiler_options(jax.default_backend())
    return jax.jit(init, out_shardings=sharding, compiler_options=options)(rng)


def abstract_train_state(model, tx) -> TrainState:
    """Shapes and dtypes of the state, without computing anything."""
    return jax.eval_shape(functools.partial(_fresh_state, model, tx), jax.random.PRNGKey(0))
