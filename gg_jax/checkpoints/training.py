"""Training checkpoints: an Orbax `CheckpointManager` in `WORKDIR/checkpoints/<step>/`.

Each checkpoint holds these items:
  variables/  {'params', 'batch_stats'}: all that evaluation and fine-tuning need;
  train/      {'step', 'opt_state'}: the rest of the train state;
  meta/       JSON: model name and options, number of classes, dataset, image size, batch, step;
  data/       the train input iterator's state, one JSON per process (Grain's checkpoint
              handler), restored on resume so that the run reads on exactly where it stopped.
Saves are asynchronous (the arrays are copied to host memory before `save` returns, then
written in the background, so the next step may reuse the device buffers) and atomic: a
run killed mid-save leaves a temporary directory that is ignored and cleaned up, never a
half-written checkpoint (saving: `writer.py`). Restoring places every array with the
shardings of the current mesh, so a run saved on 8 devices resumes on 1, 2 or 512. A
checkpoint that cannot be read is never changed or deleted: the `DamagedCheckpointError` says
which directory to move away.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

import gg_jax
from gg_jax.checkpoints.variables import CheckpointNotFoundError
from gg_jax.errors import UserError

CHECKPOINT_SUBDIR = "checkpoints"


class WorkdirMismatchError(UserError, ValueError):
    """The workdir holds checkpoints of another model or run; nothing in it was changed."""


class DamagedCheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be read; nothing was changed; the message says what to move away."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.fspath(workdir), CHECKPOINT_SUBDIR)


def run_metadata(
    *,
    model: str,
    model_options: dict[str, Any],
    num_classes: int,
    dataset: str,
    image_size: int | None = None,
    batch_size: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The `meta` item of a run's checkpoints (JSON): what `check_resumable` compares."""
    meta = {
        "model": model,
        "model_options": dict(model_options),
        "num_classes": int(num_classes),
        "dataset": dataset,
        "gg_jax_version": gg_jax.__version__,
        **extra,
    }
    if image_size is not None:
        meta["image_size"] = int(image_size)
    if batch_size is not None:
        meta["batch_size"] = int(batch_size)
    return meta


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
    import grain  # The input pipeline's iterator state (the `train` extra, as Orbax).

    handlers = {
        "variables": ocp.StandardCheckpointHandler(),
        "train": ocp.StandardCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
    }
    return ocp.CheckpointManager(os.fspath(directory), options=options, item_handlers=handlers)


# ------------------------------------------------------------------------------ reading


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def _older_step(manager, step: int) -> int | None:
    older = [s for s in manager.all_steps() if s < step]
    return max(older) if older else None


def _damaged(manager, step: int, error: BaseException, read_older) -> DamagedCheckpointError:
    """The error for a step that cannot be read, after trying the next older one with
    `read_older(older_step)` (to tell a damaged checkpoint from an incompatible one)."""
    directory = os.fspath(manager.directory)
    older = _older_step(manager, step)
    older_error = None
    if older is not None:
        try:
            read_older(older)
        except Exception as e:
            older_error = e
    path = os.path.join(directory, str(step))
    moved = os.path.join(os.path.dirname(directory.rstrip("/")), f"damaged_checkpoint_{step}")
    if older is not None and older_error is not None:
        return DamagedCheckpointError(
            f"Neither the latest checkpoint, step {step} ({_first_line(error)}), nor the one before it, step "
            f"{older} ({_first_line(older_error)}), can be read in {directory}. Nothing was changed. If their "
            "files were damaged, move both directories out of there; if they were written by another version "
            "of gg_jax, continue with that version."
        )
    resume = (
        f"the run then resumes from step {older}, the newest intact checkpoint"
        if older is not None
        else "there is no older checkpoint, so the run then starts from step 0"
    )
    return DamagedCheckpointError(
        f"The latest checkpoint, step {step}, is damaged and cannot be read ({_first_line(error)}). Nothing was "
        f"changed. Move {path} out of {directory} (e.g. `mv {path} {moved}`) and rerun the same command: {resume}."
    )


def _read_meta(manager, step: int) -> dict[str, Any]:
    restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The `meta` item of `step`; `DamagedCheckpointError` naming the directory if it cannot be read."""
    try:
        return _read_meta(manager, step)
    except Exception as e:
        raise _damaged(manager, step, e, lambda older: _read_meta(manager, older)) from None


def saved_shapes(manager: ocp.CheckpointManager, step: int) -> dict[str, tuple[int, ...]]:
    """`{'params/fc/kernel': shape, ...}` of the variables saved at `step`, read from the metadata."""
    try:
        tree = manager.item_metadata(step)["variables"].tree
    except Exception as e:
        raise _damaged(manager, step, e, lambda older: manager.item_metadata(older)["variables"].tree) from None
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def saved_abstract(manager: ocp.CheckpointManager, step: int):
    """The variables saved at `step` as a tree of `jax.ShapeDtypeStruct`s (from the metadata)."""
    try:
        tree = manager.item_metadata(step)["variables"].tree
    except Exception as e:
        raise _damaged(manager, step, e, lambda older: manager.item_metadata(older)["variables"].tree) from None
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)


def variable_shapes(variables) -> dict[str, tuple[int, ...]]:
    """`{'params/fc/kernel': shape, ...}` of a (possibly abstract) variables tree."""
    return {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(dict(variables), sep="/").items()}


def _with_shardings(abstract, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _restore_state(manager, step, target):
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            variables=ocp.args.StandardRestore({"params": target.params, "batch_stats": target.batch_stats}),
            train=ocp.args.StandardRestore({"step": target.step, "opt_state": target.opt_state}),
        ),
    )
    return target.replace(
        step=restored["train"]["step"],
        params=restored["variables"]["params"],
        batch_stats=restored["variables"]["batch_stats"],
        opt_state=restored["train"]["opt_state"],
    )


def restore_state(manager: ocp.CheckpointManager, step: int, abstract_state, shardings):
    """The train state saved at `step`, placed with `shardings` (a pytree like the state).

    `abstract_state` is a flax struct with `step`, `params`, `batch_stats` and `opt_state`
    (`gg_jax.training.state.TrainState` of ShapeDtypeStructs); the result is the same
    struct with arrays. A checkpoint that cannot be read raises `DamagedCheckpointError`
    (after reading the next older step, to tell a damaged checkpoint from an incompatible
    one); nothing is changed.
    """
    target = _with_shardings(abstract_state, shardings)
    try:
        return _restore_state(manager, step, target)
    except Exception as e:
        raise _damaged(
            manager, step, e, lambda older: jax.block_until_ready(_restore_state(manager, older, target))
        ) from None


def restore_data(manager: ocp.CheckpointManager, step: int, iterator) -> bool:
    """Restores the input iterator's state saved at `step` into `iterator` (a Grain
    `DatasetIterator` with get_state/set_state); False (nothing changed) when the checkpoint
    holds none for this process layout (saved by another number of processes, or before the
    item existed): the iterator then starts at the step it was created for."""
    import grain

    index, count = jax.process_index(), jax.process_count()
    if not (epath.Path(manager.directory) / str(step) / "data" / f"process_{index}-of-{count}.json").exists():
        return False
    manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(iterator)))
    return True


def restore_variables(manager: ocp.CheckpointManager, step: int, abstract_variables, shardings) -> dict[str, Any]:
    """The `{'params', 'batch_stats'}` saved at `step`, placed with `shardings`; a checkpoint that
    cannot be read raises `DamagedCheckpointError` saying what to move away (nothing is changed)."""
    target = _with_shardings(abstract_variables, shardings)

    def restore(at):
        return manager.restore(at, args=ocp.args.Composite(variables=ocp.args.StandardRestore(target)))

    try:
        return dict(restore(step)["variables"])
    except Exception as e:
        raise _damaged(manager, step, e, lambda older: jax.block_until_ready(restore(older))) from None


def _isdir(path: str) -> bool:
    return epath.Path(path).is_dir()  # Local paths and gs:// alike.


def locate(path: str) -> tuple[str, int | None]:
    """(checkpoint directory, step or None for the latest) for a workdir, its
    `checkpoints/` directory or one step directory `.../checkpoints/<step>`;
    `CheckpointNotFoundError` if there is no training checkpoint there."""
    path = os.fspath(path).rstrip("/")
    sub = os.path.join(path, CHECKPOINT_SUBDIR)
    if _isdir(sub):
        return sub, None
    base = os.path.basename(path)
    if base.isdigit() and _isdir(os.path.join(path, "meta")):
        return os.path.dirname(path), int(base)
    if os.path.basename(path) == CHECKPOINT_SUBDIR and _isdir(path):
        return path, None
    raise CheckpointNotFoundError(
        f"No training checkpoint at {path} (expected WORKDIR, WORKDIR/{CHECKPOINT_SUBDIR} or "
        f"WORKDIR/{CHECKPOINT_SUBDIR}/<step>)."
    )


def open_step(directory: str, step: int | None = None) -> tuple[ocp.CheckpointManager, int]:
    """A read-only manager over the checkpoints in `directory` and the step to read: `step`, or
    the latest; `CheckpointNotFoundError` if there is none."""
    manager = create_manager(directory, read_only=True)
    steps = manager.all_steps()
    if step is None:
        if not steps:
            manager.close()
            raise CheckpointNotFoundError(f"No training checkpoint in {directory} yet.")
        step = max(steps)
    elif step not in steps:
        manager.close()
        raise CheckpointNotFoundError(f"No checkpoint of step {step} in {directory} (steps there: {sorted(steps)}).")
    return manager, step


# ------------------------------------------------------------------------------ resuming


def _normalise(value):
    return json.loads(json.dumps(value, sort_keys=True)) if value is not None else None


def _describe(meta: dict[str, Any]) -> str:
    options = meta.get("model_options") or {}
    options = f" with options {options}" if options else ""
    return f"{meta.get('model')}{options}, {meta.get('num_classes')} classes (dataset {meta.get('dataset')})"


def check_resumable(
    saved: dict[str, Any],
    wanted: dict[str, Any],
    saved_shapes: dict[str, tuple[int, ...]],
    shapes: dict[str, tuple[int, ...]],
    where: str,
) -> dict[str, tuple[Any, Any]]:
    """Whether the run of `saved` (a checkpoint's meta) continues as `wanted` (this config's).

    What must agree: the model name and the shape of every variable, the dataset and the
    image size (the data), the global batch (the epoch and the learning rate) and the
    learning-rate groups (the optimizer state). Model options that change none of these
    (precision, iterations, lam, dropout, ...) may differ.

    Returns: `{option: (saved value, wanted value)}` of the model options that changed.
    Raises: `WorkdirMismatchError` saying what differs and what to do; nothing is changed.
    """
    nothing = "Nothing in the workdir was changed."
    differ = [k for k in sorted(set(saved_shapes) | set(shapes)) if saved_shapes.get(k) != shapes.get(k)]
    if saved.get("model") != wanted.get("model") or differ:
        shown = "; ".join(f"{k}: {saved_shapes.get(k)} vs {shapes.get(k)}" for k in differ[:4])
        more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
        detail = f" (variables that differ: {shown}{more})" if differ else ""
        raise WorkdirMismatchError(
            f"{where} holds checkpoints of {_describe(saved)}, but the config asks for {_describe(wanted)}{detail}. "
            f"Use a new --workdir to start this run, or set the config to match to continue the old one. {nothing}"
        )
    for field, what in (("dataset", "dataset"), ("image_size", "image size")):
        if saved.get(field) is not None and saved.get(field) != wanted.get(field):
            raise WorkdirMismatchError(
                f"{where} holds a run trained on {what} {saved[field]!r}, but the config asks for "
                f"{wanted.get(field)!r}; a run continues on the data it started with. To fine-tune it on other "
                f"data or at another size, start a new --workdir with --config.init_from={where}. {nothing}"
            )
    if saved.get("batch_size") is not None and int(saved["batch_size"]) != int(wanted["batch_size"]):
        batch, new = saved["batch_size"], wanted["batch_size"]
        raise WorkdirMismatchError(
            f"{where} holds a run trained with a global batch of {batch}, but the config asks for {new}. The epoch "
            "length and the learning rate (scaled with the batch) depend on it, so the run would not continue as it "
            f"started. To continue it, pass --config.batch_size={batch}; to train with {new}, use a new --workdir. "
            f"{nothing}"
        )
    if _normalise(saved.get("lr_groups")) != _normalise(wanted.get("lr_groups")):
        describe = lambda g: "one learning rate" if not g else ", ".join(f"{k}={v}" for k, v in sorted(g.items()))  # noqa: E731
        raise WorkdirMismatchError(
            f"{where} holds a run trained with {describe(saved.get('lr_groups'))}, but the config asks for "
            f"{describe(wanted.get('lr_groups'))}; its optimizer state cannot continue with other groups. Set "
            f"the config as the run had it, or use a new --workdir. {nothing}"
        )
    before, after = saved.get("model_options") or {}, wanted.get("model_options") or {}
    return {k: (before.get(k), after.get(k)) for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)}
