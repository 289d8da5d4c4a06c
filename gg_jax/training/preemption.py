"""Preemption: notice SIGTERM and agree on a step at which every process saves.

One process: a SIGTERM handler sets a flag that the train loop reads after every step.
The handler stays installed until the watcher is closed, which the trainer does only
after the preemption checkpoint is committed: a second SIGTERM meanwhile is logged and
ignored instead of killing the process mid-save. After a preemption, closing leaves
SIGTERM ignored, since the process is about to exit (status 143) and must not be killed
on its way out.
Several processes (`jax.distributed`): JAX's coordination service already catches
SIGTERM on any host and runs a sync protocol; `reached_preemption_sync_point(step)` is
True on every process at the same step, which is what a collective save needs.
"""

from __future__ import annotations

import logging
import signal
import threading

import jax


class PreemptionWatcher:
    """`watcher.reached(step)`: True once a SIGTERM asks the run to save and stop."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self._flag = threading.Event()
        self._previous = {}
        self._multiprocess = jax.process_count() > 1
        if not self._multiprocess and threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        del frame
        if self._flag.is_set():
            logging.warning("Received signal %d again: ignored; the run exits once its checkpoint is saved.", signum)
            return
        logging.warning("Received signal %d: saving a checkpoint after this step, then exiting.", signum)
        self._flag.set()

    def reached(self, step: int) -> bool:
        if self._multiprocess:
            from jax.experimental import multihost_utils

            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError:  # The preemption service is disabled.
                return False
        return self._flag.is_set()

    def close(self):
        """Restores the signal handlers that were there before; after a preemption, leaves
        the signals ignored instead (the process is exiting)."""
        preempted = self._flag.is_set()
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if preempted else handler)
        self._previous = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
