"""What a run reports as it goes: the train metrics between log steps and the progress line.

`TrainMetrics` is a `clu.metrics.Collection` of the step's means (loss, top-1 error), merged
on the devices between log steps and read at the log step. `Progress` reports what clu's
`periodic_actions.ReportProgress` reports (steps per second, ETA, `steps_per_sec` to the
writer) with the timing a train loop with asynchronous dispatch needs: it is called at each
log step once that step's metrics are on the host (reading them waits for the devices), its
first call is the end of the run's first step (compilation excluded), evaluations are timed
apart and left out of the rate, and the ETA adds the evaluations still due at their mean
duration. (clu's class itself is not used: `clu.periodic_actions` imports TensorFlow, which
the trainer does not need.)
"""

import contextlib
import time

import flax
import numpy as np
from absl import logging
from clu import metrics


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
    """Means over the steps since the last log step of the train step's float32 scalars."""

    loss: metrics.Average.from_output("loss")
    top1_error: metrics.Average.from_output("top1_error")


def merge(accumulated: TrainMetrics | None, step_metrics: dict) -> TrainMetrics:
    """`accumulated` with one step's `{'loss', 'top1_error'}` merged in (on the devices, no wait)."""
    new = TrainMetrics.single_from_model_output(**step_metrics)
    return new if accumulated is None else accumulated.merge(new)


def summary(accumulated: TrainMetrics) -> dict[str, float]:
    """The means as Python floats (waits for the devices). NaN/inf if any step's value was."""
    return {k: float(np.asarray(v)) for k, v in accumulated.compute().items()}


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def evals_left(step: int, total_steps: int, eval_every: int | None) -> int:
    """Evaluations after `step`: every `eval_every` steps and at the end."""
    if step >= total_steps:
        return 0
    periodic = (total_steps // eval_every - step // eval_every) if eval_every else 0
    return periodic + (0 if eval_every and total_steps % eval_every == 0 else 1)


class Progress:
    """`progress(step)` logs "Step s of N (p%): r steps/s, ETA ..." and writes `steps_per_sec`.

    Call it when step `s` has completed on the devices: first at the end of the run's first
    step (`first_step_done`, the reference point), then at each log step. `rate` is the steps
    per second of the last report, evaluations (`with progress.evaluation():`) left out.
    """

    def __init__(self, *, num_train_steps: int, writer, eval_every: "int | None"):
        self._num_train_steps = num_train_steps
        self._writer = writer
        self._eval_every = eval_every
        self._eval_seconds: list[float] = []
        self._eval_since_report = 0.0
        self._previous: tuple[int, float] | None = None  # (step, time) of the last report.
        self.rate: float | None = None

    def first_step_done(self, step: int) -> None:
        self._previous, self._eval_since_report = (step, time.monotonic()), 0.0
        logging.info(
            "Step %d of %d: the first step of this run (compilation included) is done.", step, self._num_train_steps
        )

    @contextlib.contextmanager
    def evaluation(self):
        """Times an evaluation, kept out of the rate and counted in the ETA."""
        started = time.monotonic()
        try:
            yield
        finally:
            seconds = time.monotonic() - started
            self._eval_seconds.append(seconds)
            self._eval_since_report += seconds

    def __call__(self, step: int) -> None:
        now = time.monotonic()
        if self._previous is None or step <= self._previous[0]:
            return  # The first step's line said it.
        self.rate = (step - self._previous[0]) / max(now - self._previous[1] - self._eval_since_report, 1e-9)
        self._previous, self._eval_since_report = (step, now), 0.0
        eta = (self._num_train_steps - step) / self.rate
        due = evals_left(step, self._num_train_steps, self._eval_every)
        if due and self._eval_seconds:
            eta += due * float(np.mean(self._eval_seconds))
        note = " plus evaluations" if due and not self._eval_seconds else ""
        logging.info(
            "Step %d of %d (%.1f%%): %.2f steps/s, ETA %s%s.",
            step,
            self._num_train_steps,
            100.0 * step / self._num_train_steps,
            self.rate,
            _duration(eta),
            note,
        )
        self._writer.write_scalars(step, {"steps_per_sec": self.rate})
