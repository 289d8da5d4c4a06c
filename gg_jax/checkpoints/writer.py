"""Writing a training run's checkpoints: `CheckpointWriter`, and the storage failures it reports.

A save that fails for a reason of the storage (disk full, quota, permissions, a read-only
or failing file system) is raised as one `CheckpointSaveError` as soon as it is known,
naming the latest complete checkpoint, which Orbax keeps (it deletes old checkpoints only
after a new one is committed).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from gg_jax.errors import UserError


class CheckpointSaveError(UserError, OSError):
    """A checkpoint could not be written (disk full, quota, permissions); older ones are kept."""


# Errors of the storage rather than of the program: a save failing with one of these is
# reported as a `CheckpointSaveError` (TensorStore reports them in its own exception types,
# so its messages are matched too).
_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG)


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
        from jax.experimental import multihost_utils

        if not bool(multihost_utils.broadcast_one_to_all(np.asarray(shortage is not None))):
            return None
        shortage = shortage or f"{os.strerror(errno.ENOSPC)} (on process 0)"
    return shortage


class CheckpointWriter:
    """A run's checkpoint saves: which step is committed, which is being written.

    `save(step, state)` starts an asynchronous save (after the previous one is committed);
    `poll()` notices, without waiting, a save that completed; `finish()` waits for it;
    `close()` waits and releases the manager. A failed save (storage errors only) raises
    `CheckpointSaveError` naming `last_good`, the latest complete (or completing) step.
    """

    def __init__(self, manager: ocp.CheckpointManager, meta: dict[str, Any], committed: int | None = None):
        self.manager = manager
        self.meta = meta
        self.committed = committed  # The latest checkpoint known to be complete on disk.
        self.pending: int | None = None  # The step of a save started but not known to be committed.

    @property
    def directory(self) -> str:
        return os.fspath(self.manager.directory)

    @property
    def last_good(self) -> int | None:
        """The step a rerun resumes from: the save in progress (`close` completes it) or the last committed."""
        return self.committed if self.pending is None else self.pending

    def _call(self, method, step: int | None) -> None:
        """`method()` of the manager; a storage failure of the save of `step` as `CheckpointSaveError`."""
        try:
            method()
        except Exception as e:
            reason = storage_error(e)
            if reason is None:
                raise
            raise _save_failed(step, self.directory, reason, self.committed) from None

    def _wait(self) -> None:
        self._call(self.manager.wait_until_finished, self.pending)
        if self.pending is not None:
            self.committed, self.pending = self.pending, None

    def poll(self) -> None:
        """Marks the running save committed if it completed (never waits); raises if it failed."""
        if self.pending is not None and not self.manager.is_saving_in_progress():
            self._wait()

    def finish(self) -> None:
        """Waits until the running save is committed."""
        self._wait()

    def save(self, step: int, state, data_iterator=None) -> None:
        """Starts saving `state` (with `params`, `batch_stats`, `step`, `opt_state`) as `step`,
        and `data_iterator`'s state if given (a Grain `DatasetIterator` positioned after the
        batch of `step`); returns once its arrays are on the host. A step already saved is not
        saved again.

        `CheckpointSaveError` if the file system has less space free than the arrays take
        (checked first: a save failing half-way is noisier and slower to notice), or if this
        or the previous save failed for a storage reason.
        """
        if step in (self.committed, self.pending):
            return
        if self.pending is not None:
            self._wait()  # One save at a time: the previous one must be complete first.
        short = _space_shortage(self.directory, state)
        if short:
            raise _save_failed(step, self.directory, short, self.committed)
        items = dict(
            variables=ocp.args.StandardSave({"params": state.params, "batch_stats": state.batch_stats}),
            train=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
            meta=ocp.args.JsonSave({**self.meta, "step": int(step)}),
        )
        if data_iterator is not None:
            import grain

            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        items = ocp.args.Composite(**items)
        self._call(lambda: self.manager.save(step, args=items, force=True), step)
        self.pending = step

    def close(self) -> None:
        """Waits for the running save and closes the manager. A save error here (the run
        stopped for another reason first) is logged in one line, not raised over that one."""
        try:
            self._call(self.manager.close, self.pending)
        except CheckpointSaveError as e:
            logging.error("%s", e)
        else:
            if self.pending is not None:
                self.committed, self.pending = self.pending, None
