"""Model variables on disk: `{'params', 'batch_stats'}` plus a small JSON of metadata.

This is the format that `python -m gg_jax.convert` writes and that training
(`config.init_from`, fine-tuning) and evaluation (`evaluate.py --checkpoint=DIR`) read.
Layout of DIR:
    DIR/variables/   an Orbax PyTree checkpoint of {'params': ..., 'batch_stats': ...}
    DIR/meta.json    {"model": "resnet50_3g", "num_classes": 1000, "source": ..., ...}
Training checkpoints (Orbax CheckpointManager in the workdir) are a different, richer
format (optimizer state, step); `load_variables` reads only this one.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

META_FILE = "meta.json"
VARIABLES_DIR = "variables"


def is_variables_dir(path: str) -> bool:
    """True if `path` holds variables written by `save_variables`."""
    return os.path.isfile(os.path.join(path, META_FILE)) and os.path.isdir(os.path.join(path, VARIABLES_DIR))


def save_variables(path: str, variables: dict[str, Any], meta: dict[str, Any], overwrite: bool = False) -> None:
    """Write `variables` (a pytree of arrays) and `meta` (JSON-serialisable) to `path`.

    Refuses to replace an existing checkpoint unless `overwrite`, so nothing saved is lost
    by a mistyped `--out`.
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    target = os.path.join(path, VARIABLES_DIR)
    if os.path.exists(target) and not overwrite:
        raise FileExistsError(f"{path} already holds a checkpoint; choose another directory or pass overwrite=True.")
    os.makedirs(path, exist_ok=True)
    host = jax.tree.map(lambda a: np.asarray(a), variables)
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(target, host, force=overwrite)
    with open(os.path.join(path, META_FILE), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)


def load_variables(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read `(variables, meta)` written by `save_variables`; NumPy arrays on the host."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    if not is_variables_dir(path):
        raise FileNotFoundError(
            f"{path} is not a gg_jax variables checkpoint (expected {META_FILE} and {VARIABLES_DIR}/ inside). "
            "Create one with `python -m gg_jax.convert --arch NAME --torch_checkpoint FILE --out DIR`."
        )
    with open(os.path.join(path, META_FILE)) as f:
        meta = json.load(f)
    with ocp.PyTreeCheckpointer() as ckptr:
        variables = ckptr.restore(os.path.join(path, VARIABLES_DIR))
    variables = jax.tree.map(np.asarray, variables)
    return variables, meta


def load_model(path: str, *, dtype=None, image_size: int = 224):
    """`(model, variables, meta)` of any gg_jax checkpoint, the model built from its metadata.

    Args:
      path: a variables directory (`python -m gg_jax.convert ... --out DIR`), or a training
        workdir, its `checkpoints/` directory, or one `checkpoints/<step>` directory (the
        latest step of a workdir is read).
      dtype: compute dtype of the model (default float32); the variables stay float32.
      image_size: only used to trace the model's variable shapes (any size the model takes).

    Returns:
      the linen model (`gg_jax.models.create(meta['model'], num_classes=..., **options)`),
      `{'params', 'batch_stats'}` as host NumPy arrays, and the checkpoint's metadata
      (`model`, `num_classes`, `model_options`, ... and `step` for training checkpoints).

    Raises:
      FileNotFoundError if `path` holds neither kind of checkpoint.
    """
    import jax.numpy as jnp

    from gg_jax import models

    dtype = jnp.float32 if dtype is None else dtype

    def build(meta):
        options = dict(meta.get("model_options") or {})
        return models.create(meta["model"], num_classes=int(meta["num_classes"]), dtype=dtype, **options)

    def abstract_variables(model):
        images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
        shapes = jax.eval_shape(lambda rng, x: model.init(rng, x, train=False), jax.random.PRNGKey(0), images)
        return {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})}

    if is_variables_dir(path):
        variables, meta = load_variables(path)
        return build(meta), variables, meta

    from gg_jax.training import checkpointing

    built = {}

    def abstract_fn(meta):
        built["model"] = build(meta)
        return abstract_variables(built["model"])

    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    try:
        variables, meta, step = checkpointing.restore_variables(
            path, abstract_fn, lambda abstract: jax.tree.map(lambda _: device, abstract)
        )
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{path} holds no gg_jax checkpoint: expected a variables directory ({META_FILE} and "
            f"{VARIABLES_DIR}/ inside, as `python -m gg_jax.convert` writes) or a training workdir, its "
            f"checkpoints/ directory or one checkpoints/<step> directory. ({e})"
        ) from None
    return built["model"], jax.tree.map(np.asarray, jax.device_get(variables)), {**meta, "step": int(step)}
