"""The train and eval steps, and their jitted versions sharded over a mesh.

Data parallelism by sharding (`gg_jax.sharding`: no pmap, no explicit collectives): every
reduction over the batch inside a step (the BatchNorm mean and variance, the mean loss,
hence the gradients) is over the *global* batch, the same as one device processing the
whole batch (`tests/test_training_distributed.py`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from gg_jax import cpu, sharding
from gg_jax.training.state import TrainState


def cross_entropy_loss(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def train_step(
    state: TrainState, batch: dict[str, jax.Array], *, model, tx, dropout_rng: jax.Array | None = None
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on `batch` = {'image': [B, H, W, 3] float32/bf16, 'label': [B] int32}.

    BatchNorm uses the statistics of the whole (global) batch. `dropout_rng` is the
    run's dropout key; the step's key is `fold_in(dropout_rng, state.step)`, so a
    resumed run draws the same masks as an uninterrupted one. Metrics (float32
    scalars) are means over the batch: `loss` (softmax cross-entropy) and `top1_error`.
    """
    rngs = {"dropout": jax.random.fold_in(dropout_rng, state.step)} if dropout_rng is not None else {}

    def loss_fn(params):
        logits, new_model_state = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
            rngs=rngs,
        )
        return cross_entropy_loss(logits, batch["label"]), (logits, new_model_state["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "top1_error": jnp.mean((jnp.argmax(logits, -1) != batch["label"]).astype(jnp.float32)),
    }
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
    return new_state, metrics


def eval_step(variables, batch: dict[str, jax.Array], *, model) -> dict[str, jax.Array]:
    """Sums over the valid (mask) examples of the batch: count, top-1/top-5 correct, loss.

    `image` is [B, H, W, 3], or [B, K, H, W, 3] for K crops per example (ten-crop), whose
    logits are averaged, as the reference does.
    """
    images = batch["image"]
    if images.ndim == 5:
        b, k = images.shape[:2]
        logits = model.apply(variables, images.reshape((b * k,) + images.shape[2:]), train=False)
        logits = logits.reshape(b, k, -1).mean(axis=1)
    else:
        logits = model.apply(variables, images, train=False)
    logits = logits.astype(jnp.float32)
    labels = batch["label"]
    mask = batch["mask"].astype(jnp.float32)
    k = min(5, logits.shape[-1])
    top_k = jax.lax.top_k(logits, k)[1]
    top1 = (top_k[:, 0] == labels).astype(jnp.float32)
    top5 = jnp.any(top_k == labels[:, None], axis=-1).astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {
        "count": jnp.sum(mask),
        "top1_correct": jnp.sum(top1 * mask),
        "top5_correct": jnp.sum(top5 * mask),
        "loss_sum": jnp.sum(jnp.where(mask > 0, losses, 0.0)),
    }


def needs_dropout_rng(model) -> bool:
    """Whether `model` draws random numbers in training (dropout before the classifier)."""
    return float(getattr(model, "dropout_rate", 0.0) or 0.0) > 0.0


def jit_train_step(model, tx, mesh: Mesh, state_sharding, *, seed: int = 0) -> Callable:
    """`train_step` jitted with explicit shardings: `(state, batch) -> (state, metrics)`.

    The state (replicated, `state_sharding`) is donated: its buffers are reused for the
    new state, so keep no reference to the old one. The batch is split over the mesh
    axis `data`; metrics come back replicated. Models with dropout get a 'dropout' rng
    derived from `seed` and the step.
    """
    # A host (NumPy) key: a constant of the compiled step, the same on every process.
    dropout_rng = np.asarray(jax.random.fold_in(jax.random.PRNGKey(seed), 1))
    dropout_rng = dropout_rng if needs_dropout_rng(model) else None
    return jax.jit(
        functools.partial(train_step, model=model, tx=tx, dropout_rng=dropout_rng),
        in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=(0,),
        compiler_options=cpu.compiler_options(mesh.devices.flat[0].platform),
    )


def jit_eval_step(model, mesh: Mesh, variables_sharding) -> Callable:
    return jax.jit(
        functools.partial(eval_step, model=model),
        in_shardings=(variables_sharding, sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated(mesh),
    )


def all_finite(tree: Any) -> jax.Array:
    """True if every floating-point leaf of `tree` is finite (no NaN or inf)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def jit_all_finite(mesh: Mesh) -> Callable:
    """`all_finite` jitted to a replicated scalar (readable on every process)."""
    return jax.jit(all_finite, out_shardings=sharding.replicated(mesh))


def host_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """Replicated device scalars -> Python floats (works on every process)."""
    return {k: float(v) for k, v in jax.device_get(metrics).items()}
