"""The train state, the model built from a config, initialisation and fine-tuning init.

The trainer knows models only through `gg_jax.models.create(name, num_classes=..., dtype=...,
**options)` and the linen `init` / `apply` interface, so any registered model trains.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from gg_jax import models


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


def create_train_state(model, tx, *, rng, image_size: int, sharding=None) -> TrainState:
    """A fresh state (step 0), computed by one jitted function placed with `sharding`.

    `sharding` is a pytree of shardings like the state (`replicated_sharding(...)`); on
    several hosts every process computes the same values, so the result is one global
    replicated array per leaf.
    """

    def init(rng):
        variables = _init_variables(model, rng, image_size)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=variables["params"],
            batch_stats=variables["batch_stats"],
            opt_state=tx.init(variables["params"]),
        )

    return jax.jit(init, out_shardings=sharding)(rng)


def abstract_train_state(model, tx, *, image_size: int) -> TrainState:
    """Shapes and dtypes of the state, without computing anything."""
    return jax.eval_shape(
        lambda rng: create_train_state(model, tx, rng=rng, image_size=image_size), jax.random.PRNGKey(0)
    )


def abstract_variables(model, *, image_size: int):
    return jax.eval_shape(lambda rng: _init_variables(model, rng, image_size), jax.random.PRNGKey(0))


def replicated_sharding(tree, mesh: jax.sharding.Mesh):
    """The same fully replicated `NamedSharding` for every leaf of `tree`."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(lambda _: replicated, tree)


def put_replicated(tree, sharding):
    """Host arrays (the same on every process) -> global replicated arrays with `sharding`."""

    def put(x, s):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

    return jax.tree.map(put, tree, sharding)


def merge_pretrained(
    target: Mapping[str, Any],
    source: Mapping[str, Any],
    *,
    reinit: Sequence[str] = (),
    reinit_on_shape_mismatch: Sequence[str] = ("fc",),
) -> tuple[dict[str, Any], Sequence[str]]:
    """Takes every variable of `target` from `source`, except the modules re-initialised.

    Args:
      target: freshly initialised `{'params': ..., 'batch_stats': ...}` of the model trained.
      source: pretrained variables (e.g. converted ImageNet weights).
      reinit: top-level modules (e.g. 'fc', 'head') that keep their fresh initialisation;
        source variables under them are ignored.
      reinit_on_shape_mismatch: top-level modules kept fresh when a shape differs (the
        classifier `fc` when the number of classes changes).

    Returns:
      (merged variables, names of the re-initialised variables).

    Raises:
      ValueError listing every missing, unexpected or mis-shaped variable by name.
    """
    tflat = traverse_util.flatten_dict(dict(target), sep="/")
    sflat = traverse_util.flatten_dict(jax.tree.map(np.asarray, dict(source)), sep="/")

    def module(key):  # 'params/fc/kernel' -> 'fc'
        parts = key.split("/")
        return parts[1] if len(parts) > 1 else parts[0]

    merged, kept_fresh, missing, mismatched = {}, [], [], []
    for key, value in tflat.items():
        if module(key) in reinit:
            merged[key] = value
            kept_fresh.append(key)
        elif key not in sflat:
            missing.append(key)
        elif tuple(sflat[key].shape) != tuple(value.shape):
            if module(key) in reinit_on_shape_mismatch:
                merged[key] = value
                kept_fresh.append(key)
            else:
                mismatched.append(f"{key}: pretrained {tuple(sflat[key].shape)} vs model {tuple(value.shape)}")
        else:
            merged[key] = np.asarray(sflat[key]).astype(value.dtype)
    unexpected = [k for k in sflat if k not in tflat and module(k) not in reinit]
    if missing or mismatched or unexpected:
        lines = []
        if missing:
            lines.append(f"missing in the pretrained variables: {', '.join(missing)}")
        if unexpected:
            lines.append(f"not in the model: {', '.join(unexpected)}")
        if mismatched:
            lines.append(f"shape mismatch: {'; '.join(mismatched)}")
        raise ValueError(
            "The pretrained variables do not fit the model:\n  " + "\n  ".join(lines) + "\n"
            "Check config.model (name and options) against the checkpoint, or set "
            "config.init_from_backbone_only=True to load only the backbone."
        )
    if kept_fresh:
        logging.info("Re-initialised (not loaded from the pretrained variables): %s", ", ".join(kept_fresh))
    return traverse_util.unflatten_dict(merged, sep="/"), kept_fresh
