"""Stopping a run cleanly: SIGTERM (a preemption notice) and SIGINT (Ctrl-C) save, then exit.

One process: a handler for each signal records it, and the train loop reads it after every
step: the run saves the checkpoint of that step, waits until it is committed, and returns
(`train.py` then exits with 128 + the signal's number: 143 for SIGTERM, 130 for SIGINT).
The handlers stay installed until the watcher is closed, which the trainer does only after
that checkpoint is committed: a second signal meanwhile (a second Ctrl-C included) is logged
and ignored instead of killing the process mid-save; `kill -9` still stops it at once, and
the run then resumes from the checkpoint before. After a stop, closing leaves both signals
ignored, since the process is about to exit and must not be killed on its way out.
Several processes (`jax.distributed`): JAX's coordination service already catches SIGTERM on
any host and runs a sync protocol; `reached_preemption_sync_point(step)` is True on every
process at the same step, which is what a collective save needs.
"""

from __future__ import annotations

import logging
import signal
import threading

import jax

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionWatcher:
    """`watcher.reached(step)`: the signal number once SIGTERM or SIGINT asks the run to save and stop."""

    def __init__(self, signals=SIGNALS):
        self._signal: int | None = None
        self._lock = threading.Lock()
        self._previous = {}
        self._multiprocess = jax.process_count() > 1
        # Several processes: the coordination service handles SIGTERM on every one of them (a
        # Ctrl-C reaches one process only, so it keeps its default there).
        if not self._multiprocess and threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        del frame
        with self._lock:
            first = self._signal is None
            if first:
                self._signal = signum
        name = signal.Signals(signum).name
        if not first:
            logging.warning("Received %s again: ignored; the run exits once its checkpoint is saved.", name)
            return
        logging.warning("Received %s: saving a checkpoint after this step, then exiting.", name)

    def reached(self, step: int) -> int | None:
        """The signal that asks to stop at `step` (the same step on every process), or None."""
        if self._multiprocess:
            from jax.experimental import multihost_utils

            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    return int(signal.SIGTERM)
            except RuntimeError:  # The preemption service is disabled.
                pass
        return self._signal

    def close(self):
        """Restores the handlers that were there before; after a stop, leaves the signals
        ignored instead (the process is exiting)."""
        stopped = self._signal is not None
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if stopped else handler)
        self._previous = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
