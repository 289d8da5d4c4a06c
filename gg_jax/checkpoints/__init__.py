"""Weights on disk: one loader for every kind of checkpoint, and the run config beside it.

    model, variables, meta = gg_jax.checkpoints.load("/tmp/gg_demo")
    logits = model.apply(variables, images_nhwc, train=False)

`load(path)` reads a training workdir (its latest step), its `checkpoints/` directory, one
`checkpoints/<step>` directory, a variables directory (`python -m gg_jax.convert ...
--out DIR`) or a released checkpoint ("pretrained:NAME", `gg_jax.pretrained`), and builds
the model its metadata names. Evaluation, fine-tuning
(`config.init_from`), export and diagnose all read checkpoints through it;
`run_config(path)` is the training config (`config.json`) of the run a checkpoint belongs to.

  variables.py  variables directories (`save_variables`, `load_variables`) and `merge`
  training.py   the Orbax checkpoints of a training run: the manager, reading, what a resume needs
  writer.py     saving them: `CheckpointWriter`, and the storage failures it reports
  claim.py      one run per workdir (`claim_workdir`: a lock, or a lease on object stores)
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from etils import epath

from gg_jax import models
from gg_jax.checkpoints import training
from gg_jax.checkpoints.claim import WorkdirBusyError, claim_workdir
from gg_jax.checkpoints.training import DamagedCheckpointError, WorkdirMismatchError
from gg_jax.checkpoints.variables import (
    CheckpointExistsError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    is_variables_dir,
    load_variables,
    merge,
    save_variables,
)
from gg_jax.checkpoints.writer import CheckpointSaveError, CheckpointWriter

__all__ = [
    "CheckpointExistsError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CheckpointSaveError",
    "CheckpointWriter",
    "DamagedCheckpointError",
    "WorkdirBusyError",
    "WorkdirMismatchError",
    "claim_workdir",
    "is_variables_dir",
    "load",
    "load_variables",
    "merge",
    "read_variables",
    "run_config",
    "save_variables",
]

CONFIG_FILE = "config.json"
# `load("pretrained:NAME")`: a released checkpoint of the registry (`gg_jax.pretrained`), fetched if needed.
PRETRAINED_PREFIX = "pretrained:"


def _check_shapes(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], meta, path: str) -> None:
    """`CheckpointMismatchError` listing the variables whose shapes differ (`{'params/fc/kernel': shape}`)."""
    differ = [k for k in sorted(set(expected) | set(found)) if expected.get(k) != found.get(k)]
    if differ:
        shown = "; ".join(f"{k}: checkpoint {found.get(k)} vs model {expected.get(k)}" for k in differ[:6])
        more = f"; and {len(differ) - 6} more" if len(differ) > 6 else ""
        raise CheckpointMismatchError(
            f"{path} holds {meta['model']} with options {meta.get('model_options') or {}}, whose variables do not "
            f"fit the model asked for ({shown}{more}). Give the model options the checkpoint was made with."
        )


def _resolve(path: str) -> str:
    """`path`, or for `pretrained:NAME` the cached variables directory of that registry entry
    (downloaded, verified and converted on first use: `gg_jax.pretrained.fetch`)."""
    path = os.fspath(path)
    if path.startswith(PRETRAINED_PREFIX):
        from gg_jax import pretrained  # Lazily: the registry and its converter are not needed otherwise.

        return pretrained.fetch(path[len(PRETRAINED_PREFIX) :])
    return path


def _open(path: str):
    """(manager, step) of a training checkpoint at `path`, or (None, None) for a variables directory."""
    if is_variables_dir(path):
        return None, None
    try:
        directory, step = training.locate(path)
    except CheckpointNotFoundError:
        raise CheckpointNotFoundError(
            f"{path} holds no gg_jax checkpoint: expected a variables directory (meta.json and variables/ "
            "inside, as `python -m gg_jax.convert` writes) or a training workdir, its checkpoints/ directory "
            "or one checkpoints/<step> directory."
        ) from None
    return training.open_step(directory, step)


def _restore(manager, step, abstract) -> dict[str, Any]:
    """The variables of a training checkpoint on this process's first device, as host arrays."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    variables = training.restore_variables(manager, step, abstract, jax.tree.map(lambda _: device, abstract))
    manager.close()
    return jax.tree.map(np.asarray, jax.device_get(variables))


def read_variables(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(variables, meta)` of any checkpoint `load` reads, without building its model: what
    fine-tuning merges into a fresh model of its own (`merge`)."""
    path = _resolve(path)
    manager, step = _open(path)
    if manager is None:
        return load_variables(path)
    meta = {**training.read_meta(manager, step), "step": int(step)}
    return _restore(manager, step, training.saved_abstract(manager, step)), meta


def load(path: str, *, name: str | None = None, platform: str | None = None, **options: Any):
    """`(model, variables, meta)` of any gg_jax checkpoint, the model built from its metadata.

    Args:
      path: a variables directory (`python -m gg_jax.convert ... --out DIR`), or a training
        workdir (its latest step), its `checkpoints/` directory, or one `checkpoints/<step>`
        directory (local or gs://), or "pretrained:NAME", a released checkpoint
        (`gg_jax.pretrained`: downloaded, converted and cached on the first use).
      name: if given, the model name the checkpoint must hold (`CheckpointMismatchError`
        naming both otherwise).
      platform: where the model will run (`gg_jax.models.create`'s; default: this process's
        default backend).
      **options: model options over the checkpoint's own (None: the checkpoint's), e.g.
        `dtype="bfloat16"` or `matmul_precision="tf32_3x"`; options that change a variable's
        shape make the checkpoint not fit (`CheckpointMismatchError` listing the variables).

    Returns:
      the linen model (`gg_jax.models.create(meta['model'], num_classes=..., **options)`),
      `{'params', 'batch_stats'}` as host NumPy arrays, and the checkpoint's metadata
      (`model`, `num_classes`, `model_options`, ..., and `step` for training checkpoints).

    Raises:
      CheckpointNotFoundError if `path` holds no checkpoint; DamagedCheckpointError if it
      cannot be read; CheckpointMismatchError as above.
    """
    path = _resolve(path)
    manager, step = _open(path)
    if manager is None:
        variables, meta = load_variables(path)
    else:
        meta = {**training.read_meta(manager, step), "step": int(step)}
    if name is not None and name != meta["model"]:
        if manager is not None:
            manager.close()
        raise CheckpointMismatchError(
            f"{path} holds {meta['model']} with {meta['num_classes']} classes, but {name} was asked for: pass "
            f"--config.model.name={meta['model']} (and its options), or another checkpoint."
        )
    chosen = {**(meta.get("model_options") or {}), **{k: v for k, v in options.items() if v is not None}}
    model = models.create(meta["model"], num_classes=int(meta["num_classes"]), platform=platform, **chosen)
    abstract = models.init_variables(model, jax.random.PRNGKey(0), abstract=True)
    expected = training.variable_shapes(abstract)
    if manager is None:
        _check_shapes(training.variable_shapes(variables), expected, meta, path)
    else:
        _check_shapes(training.saved_shapes(manager, step), expected, meta, path)
        variables = _restore(manager, step, abstract)
    return model, variables, meta


def run_config(path: str) -> dict[str, Any] | None:
    """The training config (`config.json`) of the run that `path` belongs to: a workdir, its
    `checkpoints/` directory or one `checkpoints/<step>` directory; None for a variables
    directory or a run without one."""
    try:
        checkpoints, _ = training.locate(path)
    except CheckpointNotFoundError:
        return None
    config = epath.Path(checkpoints).parent / CONFIG_FILE
    return json.loads(config.read_text()) if config.is_file() else None
