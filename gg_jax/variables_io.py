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
from typing import Any, Dict, Tuple

import jax
import numpy as np

META_FILE = "meta.json"
VARIABLES_DIR = "variables"


def is_variables_dir(path: str) -> bool:
    """True if `path` holds variables written by `save_variables`."""
    return os.path.isfile(os.path.join(path, META_FILE)) and os.path.isdir(os.path.join(path, VARIABLES_DIR))


def save_variables(path: str, variables: Dict[str, Any], meta: Dict[str, Any], overwrite: bool = False) -> None:
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


def load_variables(path: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
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
