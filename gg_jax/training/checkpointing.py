"""Training checkpoints: an Orbax `CheckpointManager` in `WORKDIR/checkpoints/<step>/`.

Each checkpoint holds three items:
  variables/  {'params', 'batch_stats'}: all that evaluation and fine-tuning need;
  train/      {'step', 'opt_state'}: the rest of the train state;
  meta/       JSON: model name, model options, number of classes, dataset, step.
Saves are asynchronous (the arrays are copied to host memory before `save` returns, then
written in the background, so the next step may reuse the device buffers) and atomic: a
run killed mid-save leaves a temporary directory that is ignored and cleaned up, never a
half-written checkpoint. Restoring places every array with the shardings of the current
mesh, so a run saved on 8 devices resumes on 1, 2 or 512.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

import gg_jax
from gg_jax.errors import UserError
from gg_jax.training.state import TrainState

CHECKPOINT_SUBDIR = "checkpoints"
ITEMS = ("variables", "train", "meta")
# Fields of the metadata that must agree for a workdir to be continued.
IDENTITY_FIELDS = ("model", "model_options", "num_classes")


class WorkdirMismatchError(UserError, ValueError):
    """The workdir holds checkpoints of another model; nothing in it was changed."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
    """There is no checkpoint where one was asked for."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.fspath(workdir), CHECKPOINT_SUBDIR)


def run_metadata(*, model: str, model_options: dict[str, Any], num_classes: int, dataset: str) -> dict[str, Any]:
    return {
        "model": model,
        "model_options": dict(model_options),
        "num_classes": int(num_classes),
        "dataset": dataset,
        "gg_jax_version": gg_jax.__version__,
    }


def create_manager(
    directory: str, *, max_to_keep: int | None = None, read_only: bool = False, asynchronous: bool = True
) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=asynchronous,
    )
    return ocp.CheckpointManager(os.fspath(directory), options=options, item_names=ITEMS)


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])


def check_compatible(saved: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    """Raises `WorkdirMismatchError` if `saved` (a checkpoint's meta) is another model."""
    diffs = [f for f in IDENTITY_FIELDS if _normalise(saved.get(f)) != _normalise(expected.get(f))]
    if diffs:

        def describe(m):
            opts = m.get("model_options") or {}
            opts = f" with options {opts}" if opts else ""
            return f"{m.get('model')}{opts}, {m.get('num_classes')} classes (dataset {m.get('dataset')})"

        raise WorkdirMismatchError(
            f"{where} holds checkpoints of {describe(saved)}, but the config asks for {describe(expected)} "
            f"(different: {', '.join(diffs)}). Use a new --workdir to start this run, or set the config "
            "to match to continue the old one. Nothing in the workdir was changed."
        )


def _normalise(value):
    return json.loads(json.dumps(value, sort_keys=True)) if value is not None else None


def save(manager: ocp.CheckpointManager, step: int, state: TrainState, meta: dict[str, Any]) -> None:
    """Starts an (asynchronous) save of `state` at `step`; returns once arrays are on the host."""
    manager.save(
        step,
        args=ocp.args.Composite(
            variables=ocp.args.StandardSave({"params": state.params, "batch_stats": state.batch_stats}),
            train=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
            meta=ocp.args.JsonSave({**meta, "step": int(step)}),
        ),
        force=True,
    )


def _with_shardings(abstract, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def restore_state(manager: ocp.CheckpointManager, step: int, abstract_state: TrainState, shardings) -> TrainState:
    """The train state saved at `step`, placed with `shardings` (a pytree like the state)."""
    target = _with_shardings(abstract_state, shardings)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            variables=ocp.args.StandardRestore({"params": target.params, "batch_stats": target.batch_stats}),
            train=ocp.args.StandardRestore({"step": target.step, "opt_state": target.opt_state}),
        ),
    )
    return TrainState(
        step=restored["train"]["step"],
        params=restored["variables"]["params"],
        batch_stats=restored["variables"]["batch_stats"],
        opt_state=restored["train"]["opt_state"],
    )


def locate(path: str) -> tuple[str, int | None]:
    """(checkpoint directory, step or None for the latest) for a workdir, its
    `checkpoints/` directory or one step directory `.../checkpoints/<step>`."""
    path = os.fspath(path).rstrip("/")
    sub = os.path.join(path, CHECKPOINT_SUBDIR)
    if _isdir(sub):
        return sub, None
    base = os.path.basename(path)
    if base.isdigit() and _isdir(os.path.join(path, "meta")):
        return os.path.dirname(path), int(base)
    return path, None


def _isdir(path: str) -> bool:
    return epath.Path(path).is_dir()  # Local paths and gs:// alike.


def restore_variables(path: str, abstract_fn, shardings_fn) -> tuple[dict[str, Any], dict[str, Any], int]:
    """Model variables of a training checkpoint: (variables, meta, step).

    Args:
      path: a workdir, its `checkpoints/` directory, or a step directory.
      abstract_fn: meta -> abstract `{'params', 'batch_stats'}` of the model the meta names
        (lets the caller check the meta and build the right model first).
      shardings_fn: abstract variables -> a pytree of shardings to restore onto.

    Raises:
      FileNotFoundError if there is no checkpoint at `path`.
    """
    directory, step = locate(path)
    if not _isdir(directory):
        raise CheckpointNotFoundError(f"No checkpoint at {path}.")
    manager = create_manager(directory, read_only=True)
    steps = manager.all_steps()
    if step is None:
        if not steps:
            raise CheckpointNotFoundError(
                f"No training checkpoint at {path} (expected WORKDIR, WORKDIR/{CHECKPOINT_SUBDIR} or "
                f"WORKDIR/{CHECKPOINT_SUBDIR}/<step>)."
            )
        step = max(steps)
    elif step not in steps:
        raise CheckpointNotFoundError(f"No checkpoint of step {step} in {directory} (steps there: {sorted(steps)}).")
    meta = read_meta(manager, step)
    abstract = abstract_fn(meta)
    target = _with_shardings(abstract, shardings_fn(abstract))
    restored = manager.restore(step, args=ocp.args.Composite(variables=ocp.args.StandardRestore(target)))
    manager.close()
    logging.info("Restored the variables of step %d from %s.", step, directory)
    return dict(restored["variables"]), meta, step
