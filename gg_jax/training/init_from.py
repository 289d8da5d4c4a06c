"""Fine-tuning's start: a fresh train state with the variables of `config.init_from`.

`config.init_from` is anything `gg_jax.checkpoints.load` reads (a converted variables
directory, a training workdir or one of its steps, or a released checkpoint "pretrained:NAME",
`gg_jax.pretrained`), read with `checkpoints.read_variables`. Every variable is taken from it except the
classifier `config.init_from_classifier` when the class count differs (kept fresh), and,
with `config.init_from_backbone_only` or from a released plain backbone (torchvision's
ResNets, whose metadata says `init_from_backbone_only`), the modules `config.init_from_head_modules`.
"""

from __future__ import annotations

import jax
from absl import logging

from gg_jax import checkpoints, sharding


def init_from_checkpoint(train_state, config, tx, state_sharding):
    """`train_state` (fresh, step 0) with `config.init_from`'s variables and a new optimizer state."""
    try:
        source, meta = checkpoints.read_variables(config.init_from)
    except checkpoints.CheckpointNotFoundError as e:
        raise checkpoints.CheckpointNotFoundError(f"config.init_from={config.init_from!r}: {e}") from None
    logging.info("Initialising from %s (%s).", config.init_from, meta.get("model"))
    backbone_only = config.init_from_backbone_only or bool(meta.get("init_from_backbone_only"))
    keep = tuple(config.init_from_head_modules) if backbone_only else ()
    try:
        merged, kept = checkpoints.merge(
            jax.device_get(train_state.variables),
            source,
            keep=keep,
            keep_on_shape_mismatch=(config.init_from_classifier,),
        )
    except checkpoints.CheckpointMismatchError as e:
        raise checkpoints.CheckpointMismatchError(
            f"config.init_from={config.init_from!r}: {e}\nCheck config.model (name and options) against the "
            "checkpoint, or set config.init_from_backbone_only=True to load only the backbone."
        ) from None
    if kept:
        logging.info("Re-initialised (not loaded from the pretrained variables): %s", ", ".join(kept))
    params = sharding.put_replicated(merged["params"], state_sharding.params)
    batch_stats = sharding.put_replicated(merged.get("batch_stats", {}), state_sharding.batch_stats)
    opt_state = jax.jit(tx.init, out_shardings=state_sharding.opt_state)(params)
    return train_state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state)
