"""The train loop (`train_and_evaluate`) and evaluation (`evaluate`), driven by a config.

Reads top to bottom like the Flax ImageNet example: check the config against the
devices, build the dataset info, the model and the optimizer, restore or initialise
the state, then loop: step, log, evaluate, checkpoint. The trainer knows models only
through `gg_jax.models.create` (via `state.create_model`), so any registered model
trains with any config; the optimizer and schedule come from `optim.create(config)`.
`configs/default.py` documents every field.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from etils import epath

from gg_jax import data, models, sharding, variables_io
from gg_jax.errors import UserError
from gg_jax.training import checkpointing, optim, preemption, validation
from gg_jax.training import state as state_lib
from gg_jax.training import steps as steps_lib

ConfigError = validation.ConfigError


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss or the parameters became NaN/inf; no checkpoint was written after that."""


@dataclasses.dataclass
class TrainResult:
    state: state_lib.TrainState
    step: int  # Steps done (the state's step).
    eval_metrics: dict[str, float] | None  # Of the final evaluation, if one ran.
    preempted: bool  # Stopped early by SIGTERM after saving a checkpoint.


# Errors that mean "fix the config, the data or the workdir" rather than a bug (config,
# batch size, dataset, corrupt image, workdir, checkpoint, failed save, divergence): the
# entry points print their message once, without a traceback, and exit with status 1.
USER_ERRORS = (UserError,)


# ----------------------------------------------------------------------------- checks


class _DropLibraryInfo:
    """A logging filter for Orbax's records: drops INFO and DEBUG (very chatty), the warning
    that a manager opened read-only is read-only (evaluation opens them so on purpose), and
    the tracebacks of failed saves due to the storage (disk full, ...), which the trainer
    reports itself in one line (`checkpointing.CheckpointSaveError`)."""

    def filter(self, record) -> bool:
        import logging as std_logging

        if "/orbax/" not in record.pathname.replace("\\", "/"):
            return True
        if record.levelno < std_logging.WARNING or str(record.msg).startswith("Given directory is read only"):
            return False
        error = record.exc_info[1] if record.exc_info else None
        return error is None or checkpointing.storage_error(error) is None


def _closed_loop_callback(error, tb) -> bool:
    """Whether `error` is asyncio's "Event loop is closed" raised by `call_soon_threadsafe`
    called straight from native code (`tb` starts there): TensorStore completing a write
    for an Orbax save whose event loop a failed write already closed."""
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed" and tb is not None):
        return False
    return tb.tb_frame.f_code.co_name == "call_soon_threadsafe"


def quiet_library_logs() -> None:
    """Keeps the console readable: Orbax's INFO logs are dropped (warnings stay), and so are
    its tracebacks of storage errors that the trainer reports in one line, and the
    "Event loop is closed" tracebacks that TensorStore prints for each write still running
    when such a save failed (`_closed_loop_callback`)."""
    import sys

    from absl import logging as absl_logging

    handler = absl_logging.get_absl_handler()
    if not any(isinstance(f, _DropLibraryInfo) for f in handler.filters):
        handler.addFilter(_DropLibraryInfo())
    if getattr(sys.excepthook, "_gg_jax_quiet", False):
        return
    excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

    def quiet_excepthook(exc_type, exc, tb):
        if not _closed_loop_callback(exc, tb):
            excepthook(exc_type, exc, tb)

    def quiet_unraisablehook(unraisable):
        if not _closed_loop_callback(unraisable.exc_value, unraisable.exc_traceback):
            unraisablehook(unraisable)

    quiet_excepthook._gg_jax_quiet = True
    sys.excepthook, sys.unraisablehook = quiet_excepthook, quiet_unraisablehook


def check_batch_sizes(config, mesh) -> None:
    """`sharding.BatchSizeError` unless the train and eval batches split over the devices."""
    sharding.check_batch_size(config.batch_size, mesh.size)
    sharding.check_batch_size(eval_batch_size(config), mesh.size, field="eval.batch_size")


def create_model(config, num_classes: int):
    """The model of `config.model`; `ConfigError` naming the valid names/options otherwise."""
    try:
        models.parse_name(config.model.name)
        return state_lib.create_model(config.model, num_classes, config.half_precision)
    except ValueError as e:
        raise ConfigError(f"config.model: {e}") from e


def eval_batch_size(config) -> int:
    return int(config.eval.get("batch_size") or config.batch_size)


def num_train_steps(config, info: data.DatasetInfo) -> int:
    """`config.num_train_steps` if > 0, else `num_epochs` epochs of the train split."""
    if config.num_train_steps and config.num_train_steps > 0:
        return int(config.num_train_steps)
    return int(round(config.num_epochs * data.steps_per_epoch(info, config.batch_size)))


def _every(value: int, steps_per_epoch: int) -> int | None:
    """Period in steps: value > 0 as is, 0 = once per epoch, < 0 = never (only at the end)."""
    if value is None or value < 0:
        return None
    return int(value) if value > 0 else max(int(steps_per_epoch), 1)


# ----------------------------------------------------------------------------- building blocks


def _model_meta(config, info: data.DatasetInfo, batch_size: int | None = None) -> dict[str, Any]:
    return checkpointing.run_metadata(
        model=config.model.name,
        model_options=state_lib.model_options(config.model),
        num_classes=info.num_classes,
        dataset=info.name,
        batch_size=batch_size,
    )


def _lr_groups(config) -> dict[str, Any] | None:
    """The optimizer's learning-rate groups (`optim.create`), None for one group."""
    factor = float(config.get("head_lr_factor", 1.0))
    if factor == 1.0:
        return None
    return {"head_lr_factor": factor, "head_lr_modules": list(config.get("head_lr_modules", ("head", "fc")))}


def check_same_lr_groups(saved_meta: dict[str, Any], config, workdir: str) -> None:
    """`WorkdirMismatchError` if the workdir's run has other learning-rate groups: its optimizer
    state has another structure (checkpoints without the field have one group)."""
    saved, wanted = saved_meta.get("lr_groups"), _lr_groups(config)
    if saved == wanted:
        return
    describe = lambda g: (
        "one learning rate" if g is None else f"head_lr_factor={g['head_lr_factor']} for {g['head_lr_modules']}"
    )  # noqa: E731
    raise checkpointing.WorkdirMismatchError(
        f"{workdir} holds a run trained with {describe(saved)}, but the config asks for {describe(wanted)}; "
        "its optimizer state cannot continue with other groups. Set config.head_lr_factor / head_lr_modules as "
        "the run had them, or use a new --workdir. Nothing in the workdir was changed."
    )


def check_same_batch(saved_meta: dict[str, Any], config, workdir: str) -> None:
    """`WorkdirMismatchError` if the workdir's run was trained with another global batch size
    (from its checkpoint's meta; checkpoints that predate that field: its config.json)."""
    saved = saved_meta.get("batch_size")
    if saved is None:
        path = epath.Path(workdir) / "config.json"
        try:
            saved = json.loads(path.read_text()).get("batch_size") if path.exists() else None
        except ValueError:
            saved = None
    if saved is None or int(saved) == int(config.batch_size):
        return
    raise checkpointing.WorkdirMismatchError(
        f"{workdir} holds a run trained with a global batch of {saved}, but the config asks for "
        f"{config.batch_size}. The epoch length and the learning rate (scaled with the batch) depend on it, so "
        f"the run would not continue as it started. To continue it, pass --config.batch_size={saved}; to train "
        f"with {config.batch_size}, use a new --workdir. Nothing in the workdir was changed."
    )


def _data_dtype(config):
    return jnp.bfloat16 if config.half_precision else np.float32


def _dataset_kwargs(config) -> dict[str, Any]:
    ds = config.dataset
    out = {}
    for key in ("augment", "train_resize_size", "cache", "shuffle_buffer", "num_threads"):
        if ds.get(key) is not None:
            out[key] = ds.get(key)
    return out


def _load_pretrained(config, mesh, image_size: int):
    """Host variables and meta from `config.init_from`: a variables dir or a training checkpoint."""
    path = config.init_from
    if variables_io.is_variables_dir(path):
        return variables_io.load_variables(path)

    def abstract_fn(meta):
        source_model = models.create(meta["model"], num_classes=meta["num_classes"], **meta.get("model_options", {}))
        return state_lib.abstract_variables(source_model, image_size=image_size)

    try:
        variables, meta, _ = checkpointing.restore_variables(
            path, abstract_fn, lambda a: sharding.replicated_tree(a, mesh)
        )
    except FileNotFoundError:
        raise checkpointing.CheckpointNotFoundError(
            f"config.init_from={path!r} is neither a variables directory (as written by "
            "`python -m gg_jax.convert ... --out DIR`) nor a training workdir or checkpoint."
        ) from None
    return jax.device_get(variables), meta


def init_from_pretrained(train_state, config, tx, mesh, state_sharding) -> state_lib.TrainState:
    """Replaces the fresh variables by `config.init_from`'s; re-initialises the classifier
    (`config.init_from_classifier`, on a class-count mismatch) and, with
    `config.init_from_backbone_only`, the modules in `config.init_from_head_modules`."""
    source, meta = _load_pretrained(config, mesh, config.image_size)
    logging.info("Initialising from %s (%s).", config.init_from, meta.get("model"))
    keep = tuple(config.init_from_head_modules) if config.init_from_backbone_only else ()
    classifier = config.get("init_from_classifier") or "fc"
    try:
        merged, kept = variables_io.merge(
            jax.device_get(train_state.variables), source, keep=keep, keep_on_shape_mismatch=(classifier,)
        )
    except variables_io.CheckpointMismatchError as e:
        raise variables_io.CheckpointMismatchError(
            f"config.init_from={config.init_from!r}: {e}\nCheck config.model (name and options) against the "
            "checkpoint, or set config.init_from_backbone_only=True to load only the backbone."
        ) from None
    if kept:
        logging.info("Re-initialised (not loaded from the pretrained variables): %s", ", ".join(kept))
    params = sharding.put_replicated(merged["params"], state_sharding.params)
    batch_stats = sharding.put_replicated(merged.get("batch_stats", {}), state_sharding.batch_stats)
    opt_state = jax.jit(tx.init, out_shardings=state_sharding.opt_state)(params)
    return train_state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state)


def evaluate_variables(eval_step, variables, config, mesh) -> dict[str, float]:
    """Top-1/top-5 error and loss over the whole eval split, each example exactly once."""
    it = data.create_eval_iterator(
        config.dataset.name,
        data_dir=config.dataset.data_dir,
        global_batch_size=eval_batch_size(config),
        image_size=config.image_size,
        resize_size=config.eval.resize_size,
        ten_crop=config.eval.ten_crop,
        resize_mode=config.eval.get("resize_mode") or "shorter",
        mirror_crop=bool(config.eval.get("mirror_crop", False)),
        mesh=mesh,
        dtype=_data_dtype(config),
    )
    totals = None
    for batch in it:
        out = eval_step(variables, batch)
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = steps_lib.host_scalars(totals)
    count = totals["count"]
    return {
        "top1_error": 1.0 - totals["top1_correct"] / count,
        "top5_error": 1.0 - totals["top5_correct"] / count,
        "loss": totals["loss_sum"] / count,
        "num_examples": int(round(count)),
    }


class _MetricBuffer:
    """Train metrics of the steps since the last summary (device arrays until read)."""

    def __init__(self):
        self.metrics: list[dict[str, jax.Array]] = []

    def add(self, metrics):
        self.metrics.append(metrics)

    def summary(self) -> dict[str, float]:
        stacked = jax.device_get(self.metrics)
        # In float64: the mean of float32 values cannot overflow, so it is finite exactly
        # when every value is.
        return {k: float(np.mean(np.asarray([m[k] for m in stacked], np.float64))) for k in stacked[0]}

    def all_finite(self) -> bool:
        """Whether every buffered loss is finite (reads them from the devices)."""
        return bool(all(np.isfinite(m["loss"]) for m in jax.device_get(self.metrics)))

    def reset(self):
        self.metrics = []


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class _Progress:
    """The console progress line of each log step, timed when that step's metrics are on the host.

    Steps are dispatched asynchronously: a step call returns long before the device has run
    it, so the time between calls says nothing. The progress is taken right after the log
    step's metrics were read, which waits for the device. The first reference point is the
    end of the run's first step (compilation excluded); evaluations are timed apart and kept
    out of the rate, and the ETA adds the evaluations still due at their mean duration.
    """

    def __init__(self, total_steps: int):
        self.total_steps = total_steps
        self._mark: tuple[int, float] | None = None  # (step, time) of the last reference point.
        self._eval_since_mark = 0.0
        self._eval_seconds: list[float] = []

    def start(self, step: int) -> None:
        """`step` has just completed on the device (the run's first step)."""
        self._mark, self._eval_since_mark = (step, time.monotonic()), 0.0
        logging.info(
            "Step %d of %d: the first step of this run (compilation included) is done.", step, self.total_steps
        )

    def add_eval(self, seconds: float) -> None:
        self._eval_since_mark += seconds
        self._eval_seconds.append(seconds)

    def report(self, step: int, evals_left: int) -> float | None:
        """Logs the progress of `step` (completed); returns the steps per second since the
        last report, or None when there is no interval yet (the first step)."""
        now = time.monotonic()
        if self._mark is None or step <= self._mark[0]:
            return None  # `start` said it.
        rate = (step - self._mark[0]) / max(now - self._mark[1] - self._eval_since_mark, 1e-9)
        eta = (self.total_steps - step) / rate
        if evals_left and self._eval_seconds:
            eta += evals_left * float(np.mean(self._eval_seconds))
        note = " plus evaluations" if evals_left and not self._eval_seconds else ""
        logging.info(
            "Step %d of %d (%.1f%%): %.2f steps/s, ETA %s%s.",
            step,
            self.total_steps,
            100.0 * step / self.total_steps,
            rate,
            _duration(eta),
            note,
        )
        self._mark, self._eval_since_mark = (step, now), 0.0
        return rate


def _evals_left(step: int, total_steps: int, eval_every: int | None) -> int:
    """Evaluations after `step`: every `eval_every` steps and at the end."""
    periodic = (total_steps // eval_every - step // eval_every) if eval_every else 0
    return periodic + (0 if eval_every and total_steps % eval_every == 0 else 1) if step < total_steps else 0


def _diverged(step: int, last_good: int | None, workdir: str, config) -> NonFiniteLossError:
    kept = (
        f"The last good checkpoint, step {last_good}, in {checkpointing.checkpoint_dir(workdir)} was kept"
        if last_good is not None
        else "No checkpoint had been saved"
    )
    return NonFiniteLossError(
        f"Training diverged: the loss or the parameters are NaN/inf by step {step}. {kept}; nothing was "
        "saved after the divergence. Try a lower learning rate (config.learning_rate, now "
        f"{config.learning_rate} for a batch of 256), a warmup (config.warmup_epochs), or "
        "half_precision=False; rerunning the same command resumes from the last good checkpoint."
    )


def _write_config(config, workdir: str) -> None:
    if jax.process_index() != 0:
        return
    path = epath.Path(workdir) / "config.json"
    if not path.exists():  # Never replace the config of the run that started this workdir.
        path.write_text(config.to_json_best_effort(indent=2, sort_keys=True))


# ----------------------------------------------------------------------------- training


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
    """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one.

    Every check that can fail without training (config values, model name and options,
    workdir writable, batch size over the devices, dataset present, workdir holding the
    same model and batch size, latest checkpoint readable) runs before the first step.
    On SIGTERM the current step's checkpoint is saved and committed before this returns
    with `preempted=True` (further SIGTERMs are logged and ignored meanwhile).
    """
    validation.check_train_config(config)
    workdir = os.fspath(workdir)
    create_model(config, 10)  # Unknown name or option -> ConfigError, before reading any data.
    validation.check_writable(workdir)
    mesh = sharding.make_mesh()
    check_batch_sizes(config, mesh)
    info = data.get_dataset_info(config.dataset.name, config.dataset.data_dir)  # Missing -> how to prepare.
    steps_per_epoch = data.steps_per_epoch(info, config.batch_size)
    if steps_per_epoch < 1:
        raise ConfigError(
            f"config.batch_size={config.batch_size} is larger than the {info.num_train_examples} training examples "
            f"of {info.name}: use a batch of at most {info.num_train_examples}."
        )
    model = create_model(config, info.num_classes)
    meta = {**_model_meta(config, info, batch_size=config.batch_size), "lr_groups": _lr_groups(config)}
    total_steps = num_train_steps(config, info)
    tx, schedule = optim.create(config, steps_per_epoch=steps_per_epoch, num_train_steps=total_steps)

    # Restore (same workdir = continue) or initialise. Nothing in the workdir is changed
    # until every check has passed (Orbax only removes the temporary directories of
    # interrupted saves here).
    manager = checkpointing.create_manager(
        checkpointing.checkpoint_dir(workdir),
        max_to_keep=config.keep_checkpoints,
        asynchronous=bool(config.get("async_checkpoints", True)),
    )
    latest = manager.latest_step()
    if latest is not None:
        saved_meta = checkpointing.read_meta_checked(manager, latest)
        checkpointing.check_compatible(saved_meta, meta, workdir)
        check_same_batch(saved_meta, config, workdir)
        check_same_lr_groups(saved_meta, config, workdir)
    abstract = state_lib.abstract_train_state(model, tx, image_size=config.image_size)
    state_sharding = sharding.replicated_tree(abstract, mesh)
    if latest is not None:
        train_state = checkpointing.restore_state(manager, latest, abstract, state_sharding)
        logging.info("Restored the checkpoint of step %d from %s.", latest, workdir)
    else:
        train_state = state_lib.create_train_state(
            model, tx, rng=jax.random.PRNGKey(config.seed), image_size=config.image_size, sharding=state_sharding
        )
        if config.init_from:
            train_state = init_from_pretrained(train_state, config, tx, mesh, state_sharding)
    start_step = int(latest or 0)
    if start_step >= total_steps:
        logging.info(
            "The run in %s is finished (step %d of %d); nothing to train. Evaluate it with evaluate.py.",
            workdir,
            start_step,
            total_steps,
        )
        manager.close()
        return TrainResult(train_state, start_step, None, False)

    _write_config(config, workdir)
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    logging.info(
        "Training %s on %s (%d classes) for %d steps (%d per epoch), global batch %d over %d devices, "
        "learning rate %g, from step %d.",
        config.model.name,
        info.name,
        info.num_classes,
        total_steps,
        steps_per_epoch,
        config.batch_size,
        mesh.size,
        optim.scaled_learning_rate(config.learning_rate, config.batch_size),
        start_step,
    )
    train_iter = data.create_train_iterator(
        config.dataset.name,
        data_dir=config.dataset.data_dir,
        global_batch_size=config.batch_size,
        image_size=config.image_size,
        seed=config.seed,
        start_step=start_step,
        mesh=mesh,
        dtype=_data_dtype(config),
        **_dataset_kwargs(config),
    )
    train_step = steps_lib.jit_train_step(model, tx, mesh, state_sharding, seed=config.seed)
    eval_step = steps_lib.jit_eval_step(
        model, mesh, {"params": state_sharding.params, "batch_stats": state_sharding.batch_stats}
    )
    state_is_finite = steps_lib.jit_all_finite(mesh)

    log_every = max(int(config.log_every_steps), 1)
    eval_every = _every(config.eval_every_steps, steps_per_epoch)
    checkpoint_every = _every(config.checkpoint_every_steps, steps_per_epoch)
    progress = _Progress(total_steps)
    profile = None
    if config.profile and jax.process_index() == 0:
        # One trace of 5 steps, after compilation and warm-up, into WORKDIR/plugins/profile.
        profile = periodic_actions.Profile(
            logdir=workdir,
            num_profile_steps=5,
            profile_duration_ms=None,
            first_profile=start_step + 10,
            every_secs=None,
        )

    committed = latest  # The latest checkpoint known to be complete on disk.
    pending = None  # The step of a save started but not known to be committed.
    eval_metrics = None
    buffer = _MetricBuffer()
    step = start_step
    preempted = False
    # The watcher's SIGTERM handler stays until the checkpoints are committed (the `finally`
    # below): a second SIGTERM must not kill the process while the preemption save is written.
    with preemption.PreemptionWatcher() as watcher:
        try:
            while step < total_steps:
                with jax.profiler.StepTraceAnnotation("train", step_num=step):
                    try:
                        batch = next(train_iter)
                    except data.CorruptImageError as e:
                        saved = committed if pending is None else pending
                        raise _corrupt(e, f"reading the training batch of step {step + 1}", saved) from None
                    train_state, metrics = train_step(train_state, batch)
                step += 1
                buffer.add(metrics)
                if step == start_step + 1:
                    jax.block_until_ready(metrics)  # Compilation and the first step are done.
                    progress.start(step)
                if profile is not None:
                    profile(step)
                last = step == total_steps
                preempted = watcher.reached(step)
                if pending is not None and checkpointing.check_saves(manager, pending, committed):
                    committed, pending = pending, None

                if step % log_every == 0 or last or preempted:
                    summary = buffer.summary()
                    if not np.isfinite(summary["loss"]):  # The mean of the losses: NaN/inf if any is.
                        raise _diverged(step, committed if pending is None else pending, workdir, config)
                    rate = progress.report(step, _evals_left(step, total_steps, eval_every))
                    scalars = {
                        "train/loss": summary["loss"],
                        "train/top1_error": summary["top1_error"],
                        "train/learning_rate": float(schedule(step - 1)),
                    }
                    if rate is not None:
                        scalars.update({"train/images_per_sec": rate * config.batch_size, "steps_per_sec": float(rate)})
                    writer.write_scalars(step, scalars)
                    buffer.reset()

                if (checkpoint_every and step % checkpoint_every == 0) or last or preempted:
                    # A checkpoint is written only if every loss since the last log and every
                    # variable is finite, so the latest checkpoint is always a good one.
                    if not (buffer.all_finite() and bool(state_is_finite(train_state))):
                        raise _diverged(step, committed if pending is None else pending, workdir, config)
                    if (committed is None or step > committed) and step != pending:
                        if pending is not None:  # The previous save must be complete first.
                            checkpointing.finish(manager, pending, committed)
                            committed, pending = pending, None
                        checkpointing.save(manager, step, train_state, meta, last_good=committed)
                        pending = step
                    if preempted:
                        checkpointing.finish(manager, pending, committed)
                        committed, pending = pending or committed, None
                        logging.warning(
                            "Preempted: saved the checkpoint of step %d in %s; rerun the same command to resume.",
                            committed,
                            workdir,
                        )
                        break

                if (eval_every and step % eval_every == 0) or last:
                    started = time.monotonic()
                    try:
                        eval_metrics = evaluate_variables(eval_step, train_state.variables, config, mesh)
                    except data.CorruptImageError as e:
                        raise _corrupt(
                            e, f"evaluating step {step}", committed if pending is None else pending
                        ) from None
                    progress.add_eval(time.monotonic() - started)
                    writer.write_scalars(
                        step,
                        {
                            "eval/top1_error": eval_metrics["top1_error"],
                            "eval/top5_error": eval_metrics["top5_error"],
                            "eval/loss": eval_metrics["loss"],
                        },
                    )
            if pending is not None:
                checkpointing.finish(manager, pending, committed)
                committed, pending = pending, None
        finally:
            # Whatever stopped the loop, a good checkpoint already started is completed.
            _close(manager, writer)
    if step == total_steps and eval_metrics is not None:
        logging.info(
            "Finished: %d steps in %s; top-1 error %.2f %%, top-5 error %.2f %% on the %d examples of %s/%s.",
            step,
            workdir,
            100 * eval_metrics["top1_error"],
            100 * eval_metrics["top5_error"],
            eval_metrics["num_examples"],
            info.name,
            info.eval_split,
        )
    return TrainResult(train_state, step, eval_metrics if step == total_steps else None, preempted)


def _corrupt(error, doing: str, saved: int | None) -> data.CorruptImageError:
    kept = (
        f"the checkpoint of step {saved} is kept, and rerunning the same command resumes from it"
        if saved is not None
        else "rerun the same command"
    )
    return data.CorruptImageError(
        error.path, f"{error.reason} (found while {doing}). Remove or replace the file; {kept}"
    )


def _close(manager, writer) -> None:
    """Waits for the running save and closes the manager and the writer. A save error here
    (the loop stopped for another reason) is logged in one line, not raised over the first."""
    try:
        manager.close()
    except Exception as e:
        reason = checkpointing.storage_error(e)
        if reason is None:
            raise
        logging.error("The last checkpoint save failed: %s; the checkpoints before it are kept.", reason)
    finally:
        writer.flush()
        writer.close()


# ----------------------------------------------------------------------------- evaluation


def evaluate(
    config: ml_collections.ConfigDict, workdir: str | None = None, checkpoint: str | None = None
) -> dict[str, float]:
    """Top-1/top-5 error over the whole eval split of `config.dataset`.

    checkpoint: a training workdir, its `checkpoints/<step>` directory, or a variables
      directory written by `python -m gg_jax.convert`; default: the latest in `workdir`.
    The results are logged, returned, and (if `workdir` is given) written to its
    TensorBoard summaries as eval/top1_error and eval/top5_error.
    """
    path = checkpoint or workdir
    if not path:
        raise ConfigError("Give --workdir (evaluates its latest checkpoint) or --checkpoint=PATH.")
    validation.check_eval_config(config)
    create_model(config, 10)
    if workdir:
        validation.check_writable(workdir, hint=validation.EVAL_HINT, create=False)
    mesh = sharding.make_mesh()
    sharding.check_batch_size(eval_batch_size(config), mesh.size, field="eval.batch_size")
    info = data.get_dataset_info(config.dataset.name, config.dataset.data_dir)
    model = create_model(config, info.num_classes)
    expected = _model_meta(config, info)
    abstract = state_lib.abstract_variables(model, image_size=config.image_size)
    variables_sharding = sharding.replicated_tree(abstract, mesh)

    if variables_io.is_variables_dir(path):
        host, meta = variables_io.load_variables(path)
        if meta.get("model") != config.model.name or int(meta.get("num_classes", -1)) != info.num_classes:
            raise checkpointing.WorkdirMismatchError(
                f"{path} holds {meta.get('model')} with {meta.get('num_classes')} classes, but the config asks "
                f"for {config.model.name} with {info.num_classes} classes ({info.name}). Pass "
                f"--config.model.name={meta.get('model')} and a dataset with that many classes."
            )
        merged, _ = variables_io.merge(abstract, host)
        variables = sharding.put_replicated(merged, variables_sharding)
        step = int(meta.get("step", 0))
    else:

        def abstract_fn(meta):
            checkpointing.check_compatible(meta, expected, path)
            return abstract

        variables, meta, step = checkpointing.restore_variables(path, abstract_fn, lambda _: variables_sharding)

    eval_step = steps_lib.jit_eval_step(model, mesh, variables_sharding)
    metrics = evaluate_variables(eval_step, variables, config, mesh)
    crops = "10 crops" if config.eval.ten_crop else "1 crop"
    logging.info(
        "%s on %s/%s (%d examples, %s): top-1 error %.4f, top-5 error %.4f, loss %.4f.",
        path,
        info.name,
        info.eval_split,
        metrics["num_examples"],
        crops,
        metrics["top1_error"],
        metrics["top5_error"],
        metrics["loss"],
    )
    if workdir:
        writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
        writer.write_scalars(step, {"eval/top1_error": metrics["top1_error"], "eval/top5_error": metrics["top5_error"]})
        writer.close()
    return {**metrics, "step": step}
