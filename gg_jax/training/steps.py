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


def _loss_and_grads(params, batch_stats, images, labels, *, model, rngs):
    """(loss, top-1 error, new batch_stats), gradients: one train-mode pass over `images`."""

    def loss_fn(params):
        logits, new_model_state = model.apply(
            {"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"], rngs=rngs
        )
        error = jnp.mean((jnp.argmax(logits, -1) != labels).astype(jnp.float32))
        return cross_entropy_loss(logits, labels), (error, new_model_state["batch_stats"])

    (loss, (error, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return (loss, error, batch_stats), grads


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model,
    tx,
    dropout_rng: jax.Array | None = None,
    accum_steps: int = 1,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on `batch` = {'image': [B, H, W, 3] float32/bf16, 'label': [B] int32}.

    BatchNorm uses the statistics of the whole (global) batch. `dropout_rng` is the
    run's dropout key; the step's key is `fold_in(dropout_rng, state.step)`, so a
    resumed run draws the same masks as an uninterrupted one. Metrics (float32
    scalars) are means over the batch: `loss` (softmax cross-entropy) and `top1_error`.

    accum_steps: k > 1 accumulates the gradient over k micro-batches of B / k examples
      (`lax.scan`, one micro-batch's activations in memory at a time) and updates once with
      their mean. Micro-batch i holds the examples i, i + k, i + 2k, ... (each device keeps
      its own rows). BatchNorm normalises each micro-batch with its own statistics, and the
      running averages are updated once per micro-batch, as k PyTorch steps of B / k would.
    """
    step_rng = jax.random.fold_in(dropout_rng, state.step) if dropout_rng is not None else None
    if accum_steps == 1:
        rngs = {"dropout": step_rng} if step_rng is not None else {}
        (loss, error, batch_stats), grads = _loss_and_grads(
            state.params, state.batch_stats, batch["image"], batch["label"], model=model, rngs=rngs
        )
    else:
        micro = jax.tree.map(lambda x: x.reshape(-1, accum_steps, *x.shape[1:]).swapaxes(0, 1), batch)

        def accumulate(carry, inputs):
            grads, batch_stats, loss, error = carry
            i, micro_batch = inputs
            rngs = {"dropout": jax.random.fold_in(step_rng, i)} if step_rng is not None else {}
            (micro_loss, micro_error, batch_stats), micro_grads = _loss_and_grads(
                state.params, batch_stats, micro_batch["image"], micro_batch["label"], model=model, rngs=rngs
            )
            grads = jax.tree.map(lambda g, m: g + m / accum_steps, grads, micro_grads)
            return (grads, batch_stats, loss + micro_loss / accum_steps, error + micro_error / accum_steps), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        start = (zeros, state.batch_stats, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (grads, batch_stats, loss, error), _ = jax.lax.scan(accumulate, start, (jnp.arange(accum_steps), micro))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
    return new_state, {"loss": loss, "top1_error": error}


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


def jit_train_step(model, tx, mesh: Mesh, state_sharding, *, seed: int = 0, accum_steps: int = 1) -> Callable:
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
        functools.partial(train_step, model=model, tx=tx, dropout_rng=dropout_rng, accum_steps=accum_steps),
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
