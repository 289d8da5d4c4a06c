"""The train loop: `train_and_evaluate(config, workdir)`.

Read top to bottom: check the config, build the dataset info, the model and the optimizer,
restore the workdir's latest checkpoint or initialise (fine-tuning: `init_from`), then loop:
step, log, checkpoint, evaluate. Any model of `gg_jax.models` trains with any config; every
field is documented in `configs/default.py`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from etils import epath

from gg_jax import checkpoints, data, models, sharding, summary
from gg_jax.checkpoints import training as run_checkpoints
from gg_jax.errors import UserError
from gg_jax.training import evaluation, init_from, optim, preemption, progress, validation
from gg_jax.training import state as state_lib
from gg_jax.training import steps as steps_lib


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss or the parameters became NaN/inf; no checkpoint was written after that."""


@dataclasses.dataclass
class TrainResult:
    state: state_lib.TrainState
    step: int  # Steps done (the state's step).
    eval_metrics: dict[str, float] | None  # Of the final evaluation, if one ran.
    stopped_by: int | None = None  # The signal (SIGTERM, SIGINT) that stopped the run after saving.

    @property
    def preempted(self) -> bool:
        return self.stopped_by is not None


def create_model(config, num_classes: int):
    """`gg_jax.models.create(**config.model, num_classes=...)`; ConfigError naming what is wrong."""
    try:
        return state_lib.create_model(config.model, num_classes)
    except ValueError as e:
        raise validation.ConfigError(f"config.model: {e}") from None


def _check_groups(config, model) -> None:
    """ConfigError unless every module `config.freeze` and `config.head_lr_modules` name is a
    top-level module of the model (or numbers some: `layer1` for `layer1_0`, `layer1_1`, ...)."""
    modules = sorted(models.init_variables(model, jax.random.PRNGKey(0), abstract=True)["params"])
    for field in ("freeze", "head_lr_modules"):
        unknown = [m for m in config[field] if not any(optim.matches(name, [m]) for name in modules)]
        if unknown and (field == "freeze" or config.head_lr_factor != 1.0):
            raise validation.ConfigError(
                f"config.{field}={tuple(config[field])!r}: {', '.join(map(repr, unknown))} is not a module of "
                f"{config.model.name}; its top-level modules are {', '.join(modules)}."
            )


def num_train_steps(config, info: data.DatasetInfo) -> int:
    """`config.num_train_steps` if > 0, else `num_epochs` epochs of the train split."""
    if config.num_train_steps > 0:
        return int(config.num_train_steps)
    return int(round(config.num_epochs * data.steps_per_epoch(info, config.batch_size)))


def _every(value: int, steps_per_epoch: int) -> int | None:
    """Period in steps: value > 0 as is, 0 = once per epoch, < 0 = never (only at the end)."""
    if value < 0:
        return None
    return int(value) if value > 0 else max(int(steps_per_epoch), 1)


def _shown(value) -> str:
    """An option's value in a log line; None is the model's default."""
    return "(default)" if value is None else repr(value)


def _restore_or_initialise(config, workdir, manager, model, tx, meta, state_sharding, abstract):
    """(state, start step): the workdir's latest checkpoint if it continues this run (checked
    before anything is changed), else a fresh state (from `config.init_from` if set)."""
    latest = manager.latest_step()
    if latest is None:
        state = state_lib.create_train_state(model, tx, rng=jax.random.PRNGKey(config.seed), sharding=state_sharding)
        if config.init_from:
            state = init_from.init_from_checkpoint(state, config, tx, state_sharding)
        return state, 0
    saved = run_checkpoints.read_meta(manager, latest)
    if saved.get("batch_size") is None:  # Checkpoints that predate the field: the run's config.
        saved["batch_size"] = (checkpoints.run_config(workdir) or {}).get("batch_size")
    changed = run_checkpoints.check_resumable(
        saved,
        meta,
        run_checkpoints.saved_shapes(manager, latest),
        run_checkpoints.variable_shapes(abstract.variables),
        workdir,
    )
    if changed:
        logging.info(
            "Resuming with other model options (no variable changes shape): %s.",
            ", ".join(f"{k} {_shown(a)} -> {_shown(b)}" for k, (a, b) in changed.items()),
        )
    state = run_checkpoints.restore_state(manager, latest, abstract, state_sharding)
    logging.info("Restored the checkpoint of step %d from %s.", latest, workdir)
    return state, int(latest)


def _write_config(config, workdir: str) -> None:
    if jax.process_index() != 0:
        return
    path = epath.Path(workdir) / checkpoints.CONFIG_FILE
    if not path.exists():  # Never replace the config of the run that started this workdir.
        path.write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def _diverged(step: int, last_good: int | None, workdir: str, config) -> NonFiniteLossError:
    kept = (
        f"The last good checkpoint, step {last_good}, in {run_checkpoints.checkpoint_dir(workdir)} was kept"
        if last_good is not None
        else "No checkpoint had been saved"
    )
    return NonFiniteLossError(
        f"Training diverged: the loss or the parameters are NaN/inf by step {step}. {kept}; nothing was "
        "saved after the divergence. Try a lower learning rate (config.learning_rate, now "
        f"{config.learning_rate} for a batch of 256), a warmup (config.warmup_epochs), or "
        "config.model.dtype='float32'; rerunning the same command resumes from the last good checkpoint."
    )


def _corrupt(error: data.CorruptImageError, doing: str, saved: int | None) -> data.CorruptImageError:
    kept = (
        f"the checkpoint of step {saved} is kept, and rerunning the same command resumes from it"
        if saved is not None
        else "rerun the same command"
    )
    return data.CorruptImageError(
        error.path, f"{error.reason} (found while {doing}). Remove or replace the file; {kept}"
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
    """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one.

    Every check that can fail without training (config values, model name and options,
    workdir writable, batch size over the devices, dataset present, workdir holding the
    same run, latest checkpoint readable) runs before the first step. On SIGTERM or SIGINT
    (Ctrl-C) the current step's checkpoint is saved and committed before this returns with
    `stopped_by` set (further signals are logged and ignored meanwhile).
    """
    validation.check_train_config(config)
    workdir = os.fspath(workdir)
    validation.check_writable(workdir)
    mesh = sharding.make_mesh()
    sharding.check_batch_size(config.batch_size, mesh.size)
    sharding.check_batch_size(evaluation.eval_batch_size(config), mesh.size, field="eval.batch_size")
    info = data.get_dataset_info(config.dataset.name, config.dataset.data_dir)  # Missing -> how to prepare.
    steps_per_epoch = data.steps_per_epoch(info, config.batch_size)
    if steps_per_epoch < 1:
        raise validation.ConfigError(
            f"config.batch_size={config.batch_size} is larger than the {info.num_train_examples} training examples "
            f"of {info.name}: use a batch of at most {info.num_train_examples}."
        )
    model = create_model(config, info.num_classes)
    _check_groups(config, model)
    sharding.check_batch_size(config.batch_size, mesh.size * config.grad_accum_steps, "devices x grad_accum_steps")
    total_steps = num_train_steps(config, info)
    tx, schedule = optim.create(config, steps_per_epoch=steps_per_epoch, num_train_steps=total_steps)
    meta = run_checkpoints.run_metadata(
        model=config.model.name,
        model_options={k: v for k, v in config.model.items() if k != "name" and v is not None},
        num_classes=info.num_classes,
        dataset=info.name,
        image_size=config.image_size,
        batch_size=config.batch_size,
        lr_groups=optim.lr_groups(config),
    )

    # One run per workdir; SIGTERM / Ctrl-C from here on save and stop (after the step in flight).
    with checkpoints.claim_workdir(workdir), preemption.PreemptionWatcher() as watcher:
        return _train(config, workdir, mesh, info, model, tx, schedule, meta, watcher)


def _train(config, workdir, mesh, info, model, tx, schedule, meta, watcher) -> TrainResult:
    """The loop of `train_and_evaluate`, once every check has passed and the workdir is claimed."""
    steps_per_epoch = data.steps_per_epoch(info, config.batch_size)
    total_steps = num_train_steps(config, info)
    # Restore (same workdir = continue) or initialise. Nothing in the workdir is changed
    # until every check has passed (Orbax only removes the temporary directories of
    # interrupted saves here).
    manager = run_checkpoints.create_manager(
        run_checkpoints.checkpoint_dir(workdir),
        max_to_keep=config.keep_checkpoints,
        asynchronous=config.async_checkpoints,
    )
    abstract = state_lib.abstract_train_state(model, tx)
    state_sharding = sharding.replicated_tree(abstract, mesh)
    state, start_step = _restore_or_initialise(config, workdir, manager, model, tx, meta, state_sharding, abstract)
    if start_step >= total_steps:
        logging.info("The run in %s is finished (step %d of %d); nothing to train.", workdir, start_step, total_steps)
        manager.close()
        return TrainResult(state, start_step, None)

    _write_config(config, workdir)
    writer = summary.create_writer(workdir, just_logging=jax.process_index() > 0)
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
        dtype=jnp.dtype(config.model.dtype or "float32"),
        **{k: v for k, v in config.dataset.items() if k not in ("name", "data_dir") and v is not None},
    )
    if start_step and not run_checkpoints.restore_data(manager, start_step, train_iter):
        logging.info(
            "The checkpoint holds no input state for %d processes: reading on from step %d.",
            jax.process_count(),
            start_step,
        )
    train_step = steps_lib.jit_train_step(
        model, tx, mesh, state_sharding, seed=config.seed, accum_steps=config.grad_accum_steps
    )
    eval_step = steps_lib.jit_eval_step(model, mesh, state_sharding.variables)
    state_is_finite = steps_lib.jit_all_finite(mesh)

    log_every = max(int(config.log_every_steps), 1)
    eval_every = _every(config.eval_every_steps, steps_per_epoch)
    checkpoint_every = _every(config.checkpoint_every_steps, steps_per_epoch)
    report = progress.Progress(num_train_steps=total_steps, writer=writer, eval_every=eval_every)
    # One profiler trace of 5 steps, after compilation and warm-up, into WORKDIR/plugins/profile.
    profile_from = start_step + 10 if config.profile and jax.process_index() == 0 else None
    saver = checkpoints.CheckpointWriter(manager, meta, committed=start_step or None)
    train_metrics = eval_metrics = stopped_by = None
    step = start_step
    try:
        while step < total_steps:
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                try:
                    batch = next(train_iter)
                except data.CorruptImageError as e:
                    raise _corrupt(e, f"reading the training batch of step {step + 1}", saver.last_good) from None
                state, step_metrics = train_step(state, batch)
            step += 1
            train_metrics = progress.merge(train_metrics, step_metrics)
            if step == start_step + 1:
                jax.block_until_ready(step_metrics)  # Compilation and the first step are done.
                report.first_step_done(step)
            if step == profile_from:
                jax.profiler.start_trace(workdir)
            elif profile_from is not None and step == profile_from + 5:
                jax.profiler.stop_trace()
            last = step == total_steps
            stopped_by = watcher.reached(step)
            saver.poll()

            if step % log_every == 0 or last or stopped_by:
                means = progress.summary(train_metrics)  # Waits for this step's metrics.
                if not all(map(math.isfinite, means.values())):
                    raise _diverged(step, saver.last_good, workdir, config)
                report(step)
                scalars = {f"train/{k}": v for k, v in means.items()}
                scalars["train/learning_rate"] = float(schedule(step - 1))
                if report.rate is not None:
                    scalars["train/images_per_sec"] = report.rate * config.batch_size
                writer.write_scalars(step, scalars)
                train_metrics = None

            if (checkpoint_every and step % checkpoint_every == 0) or last or stopped_by:
                # A checkpoint is written only if every loss since the last log and every
                # variable is finite, so the latest checkpoint is always a good one.
                losses_finite = train_metrics is None or all(
                    map(math.isfinite, progress.summary(train_metrics).values())
                )
                if not (losses_finite and bool(state_is_finite(state))):
                    raise _diverged(step, saver.last_good, workdir, config)
                saver.save(step, state, train_iter)
                if stopped_by:
                    saver.finish()
                    logging.warning(
                        "Stopped by %s: saved the checkpoint of step %d in %s; rerun the same command to resume.",
                        signal.Signals(stopped_by).name,
                        saver.committed,
                        workdir,
                    )
                    break

            if (eval_every and step % eval_every == 0) or last:
                with report.evaluation():
                    try:
                        eval_metrics = evaluation.evaluate_variables(eval_step, state.variables, config, mesh)
                    except data.CorruptImageError as e:
                        raise _corrupt(e, f"evaluating step {step}", saver.last_good) from None
                writer.write_scalars(step, {f"eval/{k}": eval_metrics[k] for k in ("top1_error", "top5_error", "loss")})
        saver.finish()
    finally:
        # Whatever stopped the loop, a good checkpoint already started is completed.
        try:
            saver.close()
        finally:
            train_iter.close()
            writer.flush()
            writer.close()
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
    return TrainResult(state, step, eval_metrics if step == total_steps else None, stopped_by)
