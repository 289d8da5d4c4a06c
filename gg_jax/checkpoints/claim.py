"""One run per workdir: an exclusive claim that a training run holds for its whole lifetime.

Two runs writing checkpoints into one workdir overwrite each other's steps, so the second is
refused in one line naming the holder (host, pid, since when). The run's process 0 holds the
claim for all its processes (`jax.distributed`: the others learn the outcome from it).

  local disks   `WORKDIR/.gg_jax_claim`, locked with `fcntl.flock`: the kernel releases the
                lock when the holding process ends, however it ends, so a claim left by a
                dead process is taken over (with a log line naming it);
  object stores (gs://, s3://, ...: no locks) a lease: the same file, holding an expiry time
                that a thread of the holder renews every `LEASE_SECONDS / 3`; a lease not
                renewed for `LEASE_SECONDS` (a dead or cut-off holder) is taken over.
The claim file is removed when the run ends.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid

from etils import epath

from gg_jax.errors import UserError

CLAIM_FILE = ".gg_jax_claim"
LEASE_SECONDS = 120.0
# After writing a lease, how long to wait before reading it back: a competing writer that read
# the same expired lease has written its own by then, and only the last writer keeps it.
_SETTLE_SECONDS = 2.0


class WorkdirBusyError(UserError, RuntimeError):
    """Another run holds the workdir; nothing in it was changed."""


def _holder() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "token": uuid.uuid4().hex,
    }


def _describe(info: dict) -> str:
    return f"host {info.get('host')}, pid {info.get('pid')}, since {info.get('since')}"


def _busy(workdir: str, info: dict) -> WorkdirBusyError:
    return WorkdirBusyError(
        f"{workdir} is in use by another training run ({_describe(info)}): two runs in one workdir would "
        "overwrite each other's checkpoints. Wait for it to finish or stop it, or use another --workdir. "
        "Nothing in the workdir was changed."
    )


def _read(path) -> dict:
    try:
        return json.loads(epath.Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def _local_claim(workdir: str):
    import fcntl

    path = os.path.join(workdir, CLAIM_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(workdir, _read(path)) from None
        previous = _read(path)
        if previous:
            logging.warning(
                "Taking over the claim on %s left by a run that is no longer running (%s).",
                workdir,
                _describe(previous),
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # Emptied before the unlock: a new run finds nothing to take over.
            with contextlib.suppress(OSError):
                os.unlink(path)
    finally:
        os.close(fd)  # Releases the lock.


@contextlib.contextmanager
def _lease_claim(workdir: str, lease_seconds: float = LEASE_SECONDS):
    path = epath.Path(workdir) / CLAIM_FILE
    previous = _read(path) if path.exists() else {}
    if previous and previous.get("expires", 0) > time.time():
        raise _busy(workdir, previous)
    if previous:
        logging.warning(
            "Taking over the lease on %s of a run that stopped renewing it (%s).", workdir, _describe(previous)
        )
    mine = _holder()

    def write():
        path.write_text(json.dumps({**mine, "expires": time.time() + lease_seconds}))

    write()
    time.sleep(min(_SETTLE_SECONDS, lease_seconds / 4))
    current = _read(path)
    if current.get("token") != mine["token"]:
        raise _busy(workdir, current)
    stop = threading.Event()

    def renew():
        while not stop.wait(lease_seconds / 3):
            try:
                write()
            except OSError as e:  # The next renewal may work; the lease lasts three periods.
                logging.warning("Could not renew the lease on %s: %s", workdir, e)

    thread = threading.Thread(target=renew, name="gg_jax-workdir-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(OSError):
            if _read(path).get("token") == mine["token"]:
                path.unlink()


def _claim(workdir: str, lease_seconds: float | None):
    if lease_seconds is None and "://" not in workdir:
        return _local_claim(workdir)
    return _lease_claim(workdir, lease_seconds or LEASE_SECONDS)


@contextlib.contextmanager
def claim_workdir(workdir: str, *, lease_seconds: float | None = None):
    """Holds `workdir` for one training run while the `with` block runs; `WorkdirBusyError` if
    another run holds it. `lease_seconds` forces a lease (the object-store claim) on any path."""
    import jax

    workdir = os.fspath(workdir)
    error = None
    with contextlib.ExitStack() as stack:
        if jax.process_index() == 0:
            try:
                stack.enter_context(_claim(workdir, lease_seconds))
            except WorkdirBusyError as e:
                error = e
        if jax.process_count() > 1:
            import numpy as np
            from jax.experimental import multihost_utils

            busy = bool(multihost_utils.broadcast_one_to_all(np.asarray(error is not None)))
            if busy and error is None:
                error = WorkdirBusyError(f"{workdir} is in use by another training run (see process 0's message).")
        if error is not None:
            raise error
        yield
