"""Training checkpoints: an Orbax `CheckpointManager` in `WORKDIR/checkpoints/<step>/`.

Each checkpoint holds three items:
  variables/  {'params', 'batch_stats'}: all that evaluation and fine-tuning need;
  train/      {'step', 'opt_state'}: the rest of the train state;
  meta/       JSON: model name, model options, number of classes, dataset, step.
Saves are asynchronous (the arrays are copied to host memory before `save` returns, then
written in the background, so the next step may reuse the device buffers) and atomic: a
run killed mid-save leaves a temporary directory that is ignored and cleaned up, never a
half-written checkpoint. A save that fails (disk full, quota, permissions) is raised as
one `CheckpointSaveError` as soon as it is known (`check_saves`, `finish`); Orbax deletes
old checkpoints only after a new one is committed, so the older ones stay. Restoring
places every array with the shardings of the current mesh, so a run saved on 8 devices
resumes on 1, 2 or 512. A checkpoint that cannot be read is never changed or deleted: the
`DamagedCheckpointError` says which directory to move away.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
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
    """The workdir holds checkpoints of another model or run; nothing in it was changed."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
    """There is no checkpoint where one was asked for."""


class DamagedCheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be read; nothing was changed; the message says what to move away."""


class CheckpointSaveError(UserError, OSError):
    """A checkpoint could not be written (disk full, quota, permissions); older ones are kept."""


# Errors of the storage rather than of the program: a save failing with one of these is
# reported as a `CheckpointSaveError` (TensorStore reports them in its own exception types,
# so its messages are matched too).
_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG)


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.fspath(workdir), CHECKPOINT_SUBDIR)


def run_metadata(
    *, model: str, model_options: dict[str, Any], num_classes: int, dataset: str, batch_size: int | None = None
) -> dict[str, Any]:
    meta = {
        "model": model,
        "model_options": dict(model_options),
        "num_classes": int(num_classes),
        "dataset": dataset,
        "gg_jax_version": gg_jax.__version__,
    }
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


def storage_error(error: BaseException) -> str | None:
    """The reason ("No space left on device", ...) if `error` or one it was raised from is a
    storage failure (see `_STORAGE_ERRNOS`), else None."""
    seen = set()
    todo = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS:
            return os.strerror(e.errno)
        text = str(e)
        for code in _STORAGE_ERRNOS:
            if os.strerror(code) in text:
                return os.strerror(code)
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    return None


def _save_failed(step: int, directory: str, reason: str, last_good: int | None) -> CheckpointSaveError:
    kept = (
        f"The checkpoint of step {last_good} is the latest complete one (kept); rerunning the same command "
        "resumes from it"
        if last_good is not None
        else "No checkpoint was completed before; rerunning the same command starts over"
    )
    return CheckpointSaveError(
        f"Could not save the checkpoint of step {step} in {directory}: {reason}. Training stopped. {kept} once "
        "the problem is fixed (free disk space, or use another --workdir)."
    )


def save(
    manager: ocp.CheckpointManager, step: int, state: TrainState, meta: dict[str, Any], last_good: int | None = None
) -> None:
    """Starts an (asynchronous) save of `state` at `step`; returns once arrays are on the host.

    `CheckpointSaveError` if this save cannot start, if the file system has less space free
    than the arrays take (checked first: a save failing half-way is noisier and slower to
    notice), or if the previous one failed (storage errors only; `last_good`, the latest
    committed step, is named in the message).
    """
    directory = os.fspath(manager.directory)
    short = _space_shortage(directory, state)
    if short:
        raise _save_failed(step, directory, short, last_good)
    try:
        manager.save(
            step,
            args=ocp.args.Composite(
                variables=ocp.args.StandardSave({"params": state.params, "batch_stats": state.batch_stats}),
                train=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
                meta=ocp.args.JsonSave({**meta, "step": int(step)}),
            ),
            force=True,
        )
    except Exception as e:
        reason = storage_error(e)
        if reason is None:
            raise
        raise _save_failed(step, os.fspath(manager.directory), reason, last_good) from None


def _space_shortage(directory: str, state) -> str | None:
    """The reason, `No space left on device (...)`, if the local file system holding
    `directory` has less space free than `state`'s arrays take, else None (also for remote
    paths). On several processes the answer is process 0's, so that all of them stop or save
    together."""
    shortage = None
    if "://" not in directory:
        need = sum(int(x.nbytes) for x in jax.tree.leaves(state))
        free = shutil.disk_usage(directory).free
        if free < need:
            shortage = (
                f"{os.strerror(errno.ENOSPC)} (the checkpoint takes about {need / 2**20:.0f} MiB, "
                f"{free / 2**20:.0f} MiB are free)"
            )
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        if not bool(multihost_utils.broadcast_one_to_all(np.asarray(shortage is not None))):
            return None
        shortage = shortage or f"{os.strerror(errno.ENOSPC)} (on process 0)"
    return shortage


def check_saves(manager: ocp.CheckpointManager, step: int | None, last_good: int | None) -> bool:
    """Without blocking: True if no save is running (the last one, of `step`, is committed),
    False while one is; `CheckpointSaveError` if it failed."""
    if manager.is_saving_in_progress():
        return False
    finish(manager, step, last_good)
    return True


def finish(manager: ocp.CheckpointManager, step: int | None, last_good: int | None) -> None:
    """Waits until the running save (of `step`) is committed; `CheckpointSaveError` if it failed."""
    try:
        manager.wait_until_finished()
    except Exception as e:
        reason = storage_error(e)
        if reason is None:
            raise
        raise _save_failed(step, os.fspath(manager.directory), reason, last_good) from None


def _with_shardings(abstract, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _restore_state(manager, step, target) -> TrainState:
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


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def _damaged(directory: str, step: int, error: BaseException, older: int | None, older_error) -> DamagedCheckpointError:
    """The error for a step that cannot be read; `older` is the next older step, `older_error`
    what reading it raised (None: it reads fine)."""
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


def read_meta_checked(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """`read_meta`, with a `DamagedCheckpointError` naming the directory if it cannot be read."""
    try:
        return read_meta(manager, step)
    except Exception as e:
        older = _older_step(manager, step)
        older_error = None
        if older is not None:
            try:
                read_meta(manager, older)
            except Exception as e2:
                older_error = e2
        raise _damaged(os.fspath(manager.directory), step, e, older, older_error) from None


def _older_step(manager, step: int) -> int | None:
    older = [s for s in manager.all_steps() if s < step]
    return max(older) if older else None


def restore_state(manager: ocp.CheckpointManager, step: int, abstract_state: TrainState, shardings) -> TrainState:
    """The train state saved at `step`, placed with `shardings` (a pytree like the state).

    A checkpoint that cannot be read raises `DamagedCheckpointError` (after reading the next
    older step, to tell a damaged checkpoint from an incompatible one); nothing is changed.
    """
    target = _with_shardings(abstract_state, shardings)
    try:
        return _restore_state(manager, step, target)
    except Exception as e:
        older = _older_step(manager, step)
        older_error = None
        if older is not None:
            try:
                jax.block_until_ready(_restore_state(manager, older, target))
            except Exception as e2:
                older_error = e2
        raise _damaged(os.fspath(manager.directory), step, e, older, older_error) from None


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
      CheckpointNotFoundError (a FileNotFoundError) if there is no checkpoint at `path`;
      DamagedCheckpointError if it cannot be read.
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
    meta = read_meta_checked(manager, step)
    abstract = abstract_fn(meta)
    target = _with_shardings(abstract, shardings_fn(abstract))
    try:
        restored = manager.restore(step, args=ocp.args.Composite(variables=ocp.args.StandardRestore(target)))
    except Exception as e:
        raise DamagedCheckpointError(
            f"The checkpoint of step {step} in {directory} cannot be read ({_first_line(e)}). Nothing was changed."
        ) from None
    manager.close()
    logging.info("Restored the variables of step %d from %s.", step, directory)
    return dict(restored["variables"]), meta, step
