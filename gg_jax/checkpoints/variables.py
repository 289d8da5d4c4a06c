"""Variables directories: a model's `{'params', 'batch_stats'}` plus a small JSON of metadata.

The format that `python -m gg_jax.convert` and the pretrained registry write, and that
`gg_jax.checkpoints.load` reads beside the training checkpoints. Layout of DIR:
    DIR/variables/   an Orbax PyTree checkpoint of {'params': ..., 'batch_stats': ...}
    DIR/meta.json    {"model": "resnet50_3g", "num_classes": 1000, "model_options": {...}, ...}
`merge` puts such variables (or a training checkpoint's) into a freshly initialised model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from gg_jax.errors import UserError

META_FILE = "meta.json"
VARIABLES_DIR = "variables"


class CheckpointMismatchError(UserError, ValueError):
    """Variables (or a checkpoint) do not fit the model: lists every problem by name."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
    """There is no checkpoint where one was asked for."""


class CheckpointExistsError(UserError, FileExistsError):
    """A checkpoint is already where one was to be written; nothing was replaced."""


def merge(
    target: Mapping[str, Any],
    source: Mapping[str, Any],
    *,
    keep: Sequence[str] = (),
    keep_on_shape_mismatch: Sequence[str] = (),
    partial_source: bool = False,
) -> tuple[dict[str, Any], list[str]]:
    """`target`'s variables replaced by `source`'s (pretrained weights into a fresh model).

    Args:
      target: freshly initialised `{'params': ..., 'batch_stats': ...}` of the model.
      source: pretrained variables of the same layout (host or device arrays).
      keep: top-level modules (e.g. 'fc', 'head') that keep the target's values; source
        variables under them are ignored.
      keep_on_shape_mismatch: top-level modules that keep the target's values where a shape
        differs (the classifier `fc` when the number of classes changes).
      partial_source: variables missing from `source` keep the target's values (e.g. a
        backbone alone, `gg_jax.convert.from_torch(..., backbone_only=True)`); otherwise
        they are an error.

    Returns:
      (merged variables as host arrays of the target's dtypes, names of the variables that
      kept the target's values, as 'params/fc/kernel').

    Raises:
      CheckpointMismatchError listing every missing, unexpected or mis-shaped variable.
    """
    tflat = traverse_util.flatten_dict(dict(target), sep="/")
    sflat = traverse_util.flatten_dict(jax.tree.map(np.asarray, dict(source)), sep="/")

    def module(key):  # 'params/fc/kernel' -> 'fc'
        parts = key.split("/")
        return parts[1] if len(parts) > 1 else parts[0]

    merged, kept, missing, mismatched = {}, [], [], []
    for key, value in tflat.items():
        if module(key) in keep or (partial_source and key not in sflat):
            merged[key] = np.asarray(value)
            kept.append(key)
        elif key not in sflat:
            missing.append(key)
        elif tuple(sflat[key].shape) != tuple(value.shape):
            if module(key) in keep_on_shape_mismatch:
                merged[key] = np.asarray(value)
                kept.append(key)
            else:
                mismatched.append(f"{key}: pretrained {tuple(sflat[key].shape)} vs model {tuple(value.shape)}")
        else:
            merged[key] = sflat[key].astype(value.dtype)
    unexpected = [k for k in sflat if k not in tflat and module(k) not in keep]
    if missing or mismatched or unexpected:
        lines = []
        if missing:
            lines.append(f"missing in the pretrained variables: {', '.join(missing)}")
        if unexpected:
            lines.append(f"not in the model: {', '.join(unexpected)}")
        if mismatched:
            lines.append(f"shape mismatch: {'; '.join(mismatched)}")
        raise CheckpointMismatchError("The pretrained variables do not fit the model:\n  " + "\n  ".join(lines))
    return traverse_util.unflatten_dict(merged, sep="/"), kept


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
        raise CheckpointExistsError(
            f"{path} already holds a checkpoint; choose another directory, or pass --overwrite "
            "(overwrite=True) to replace it."
        )
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
        raise CheckpointNotFoundError(
            f"{path} is not a gg_jax variables checkpoint (expected {META_FILE} and {VARIABLES_DIR}/ inside). "
            "Create one with `python -m gg_jax.convert --arch NAME --torch_checkpoint FILE --out DIR`."
        )
    with open(os.path.join(path, META_FILE)) as f:
        meta = json.load(f)
    with ocp.PyTreeCheckpointer() as ckptr:
        variables = ckptr.restore(os.path.join(path, VARIABLES_DIR))
    variables = jax.tree.map(np.asarray, variables)
    return variables, meta
