"""Checks of a config and a workdir that need no devices, no variables and no data.

`check_train_config(config)` and `check_eval_config(config)` raise one `ConfigError` that
names every field with a value that cannot run, and what to use instead;
`check_writable(workdir)` raises `WorkdirError` unless files can be created there. The
entry points call them before the devices are touched and anything is read or written, so a
nonsense config stops within seconds; `trainer.train_and_evaluate` and
`evaluation.evaluate` call them again for library users. The model section is checked by
constructing the model's modules (`gg_jax.models.create`: option names and ranges, no
variables), and the image size against the model's strides.
"""

from __future__ import annotations

import math
import os
import tempfile

from gg_jax.errors import UserError

LR_SCHEDULES = ("step", "cosine", "constant")
RESIZE_MODES = ("shorter", "square")


class ConfigError(UserError, ValueError):
    """The config cannot run (on this setup); the message says what to change."""


class WorkdirError(UserError, OSError):
    """The workdir cannot be written; nothing was trained."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _get(config, dotted: str, default=None):
    node = config
    for part in dotted.split("."):
        if node is None or part not in node:
            return default
        node = node[part]
    return node


def _batch_problems(config) -> list[str]:
    problems = []
    batch = _get(config, "batch_size")
    if not _is_int(batch) or batch <= 0:
        problems.append(f"config.batch_size={batch!r} must be a positive integer (the global batch)")
    eval_batch = _get(config, "eval.batch_size", 0)
    if not _is_int(eval_batch) or eval_batch < 0:
        problems.append(f"config.eval.batch_size={eval_batch!r} must be a positive integer, or 0 for batch_size")
    image_size = _get(config, "image_size")
    if not _is_int(image_size) or image_size <= 0:
        problems.append(f"config.image_size={image_size!r} must be a positive integer (pixels)")
    for field in ("model.name", "dataset.name"):
        value = _get(config, field)
        if not isinstance(value, str) or not value:
            problems.append(f"config.{field}={value!r} must name a {field.split('.')[0]}")
    resize_mode = _get(config, "eval.resize_mode", "shorter")
    if resize_mode not in RESIZE_MODES:
        problems.append(f"config.eval.resize_mode={resize_mode!r} is not one of {', '.join(RESIZE_MODES)}")
    if _get(config, "eval.ten_crop", False) and _get(config, "eval.mirror_crop", False):
        problems.append("config.eval.ten_crop and config.eval.mirror_crop exclude each other: set one of them")
    return problems


def _model_problems(config) -> list[str]:
    """The model's name and options (`gg_jax.models.create` checks them), and an image size that
    leaves the head at least 2 positions of the last feature map."""
    from gg_jax import models

    model = _get(config, "model")
    if model is None or not isinstance(model.get("name"), str):
        return []  # `_batch_problems` names it.
    options = {k: v for k, v in model.items() if k != "name"}
    problems = []
    try:
        # Constructs the modules only (no variables); "cpu" so that no device is touched.
        models.create(model["name"], num_classes=1, platform="cpu", **options)
    except models.UnknownOptionsError as e:
        unset = " ".join(f"--config.model.{name}=None" for name in e.unknown)
        problems.append(f"config.model: {e} Unset an option of another model with {unset}".rstrip("."))
    except ValueError as e:
        problems.append(f"config.model: {e}".rstrip("."))
        if "Unknown model name" in str(e):
            return problems
    image_size = _get(config, "image_size")
    last_stride = options.get("last_stride")
    if _is_int(image_size) and image_size > 0 and last_stride in (None, 1, 2):
        size = models.feature_map_size(model["name"], image_size, last_stride=last_stride)
        if size * size < 2:
            smallest = models.smallest_image_size(model["name"], last_stride)
            problems.append(
                f"config.image_size={image_size} leaves {model['name']} a {size}x{size} last feature map, but its "
                "head needs at least 2 positions (the covariance of one position is zero, the same for every "
                f"image): use image_size >= {smallest}"
            )
    return problems


def _raise(problems: list[str]) -> None:
    if problems:
        raise ConfigError("; ".join(problems) + ".")


def check_eval_config(config) -> None:
    """`ConfigError` unless the fields that evaluation reads can run (batch sizes, image size,
    names, the model's options)."""
    _raise(_batch_problems(config) + _model_problems(config))


def check_train_config(config) -> None:
    """`ConfigError` listing every training field that cannot run, with what to use instead.

    Checked: positive batch sizes and image size; a positive training length (`num_train_steps`
    > 0 or `num_epochs` > 0); `learning_rate` > 0; a known `lr_schedule` and
    `dataset.augment`; `dataset.train_resize_size` >= `image_size`; `head_lr_factor` > 0,
    `warmup_epochs` >= 0, `lr_decay_factor` > 0, `momentum` in [0, 1), `weight_decay` >= 0;
    `keep_checkpoints` >= 1 (Orbax would delete every checkpoint at 0); the evaluation's
    `resize_mode` and crops (also checked for evaluation).
    """
    problems = _batch_problems(config)
    steps, epochs = _get(config, "num_train_steps", -1), _get(config, "num_epochs", 0)
    if not (_is_number(steps) and steps > 0) and not (_is_number(epochs) and epochs > 0):
        problems.append(
            f"nothing to train: config.num_train_steps={steps!r} and config.num_epochs={epochs!r}; set "
            "num_epochs > 0 (epochs of the train split) or num_train_steps > 0 (which overrides num_epochs)"
        )
    lr = _get(config, "learning_rate")
    if not _is_number(lr) or not lr > 0:  # `not >` also refuses NaN.
        problems.append(f"config.learning_rate={lr!r} must be > 0 (the rate for a batch of 256)")
    schedule = _get(config, "lr_schedule", "step")
    if schedule not in LR_SCHEDULES:
        problems.append(f"config.lr_schedule={schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
    augment = _get(config, "dataset.augment")
    if augment is not None:
        from gg_jax.data import AUGMENTATIONS

        if augment not in AUGMENTATIONS:
            problems.append(
                f"config.dataset.augment={augment!r} is not one of {', '.join(AUGMENTATIONS)} (or unset for the "
                "dataset's default)"
            )
    resize = _get(config, "dataset.train_resize_size")
    if resize is not None and (not _is_int(resize) or resize < (_get(config, "image_size") or 0)):
        problems.append(
            f"config.dataset.train_resize_size={resize!r} must be an integer >= image_size (the crop), or unset"
        )
    bounds = [
        ("head_lr_factor", 1.0, lambda v: v > 0, "> 0 (1 for one learning rate)"),
        ("warmup_epochs", 0.0, lambda v: v >= 0, ">= 0"),
        ("lr_decay_factor", 0.1, lambda v: v > 0, "> 0"),
        ("momentum", 0.9, lambda v: 0 <= v < 1, "in [0, 1)"),
        ("weight_decay", 0.0, lambda v: v >= 0, ">= 0"),
    ]
    for field, default, ok, what in bounds:
        value = _get(config, field, default)
        if not _is_number(value) or math.isnan(value) or not ok(value):
            problems.append(f"config.{field}={value!r} must be {what}")
    accum = _get(config, "grad_accum_steps", 1)
    if not _is_int(accum) or accum < 1:
        problems.append(f"config.grad_accum_steps={accum!r} must be an integer >= 1 (1: no accumulation)")
    for field in ("freeze", "head_lr_modules"):
        names = _get(config, field, ())
        if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
            problems.append(f"config.{field}={names!r} must be a tuple of module names, e.g. ('conv1', 'layer1')")
    keep = _get(config, "keep_checkpoints", 1)
    if not _is_int(keep) or keep < 1:
        problems.append(
            f"config.keep_checkpoints={keep!r} must be >= 1: it is how many of the latest checkpoints are kept, "
            "and the latest one is what a rerun resumes from"
        )
    _raise(problems + _model_problems(config))


_TRAIN_HINT = "Checkpoints and summaries are written there: choose a writable --workdir. Nothing was trained."
EVAL_HINT = (
    "evaluate.py writes the results to the workdir's summaries: choose a writable --workdir, or pass "
    "--checkpoint=DIR instead to evaluate without writing anything."
)


def check_writable(workdir: str, hint: str = _TRAIN_HINT, create: bool = True) -> None:
    """Creates `workdir` if needed (if `create`; else a missing workdir is not checked) and
    checks that files can be created in it (and in its `checkpoints/`, if that exists);
    `WorkdirError` naming the directory and the reason, then `hint`, otherwise.

    Local paths use the os module; URLs (gs://...) go through etils.epath.
    """
    path = os.fspath(workdir)
    directory = path
    try:
        if "://" in path:
            from etils import epath

            root = epath.Path(path)
            if not create and not root.exists():
                return
            root.mkdir(parents=True, exist_ok=True)
            probe = root / f".gg_jax_write_test_{os.getpid()}_{os.urandom(4).hex()}"
            probe.write_text("")
            probe.unlink()
            return
        if not create and not os.path.exists(path):
            return
        os.makedirs(path, exist_ok=True)
        checkpoints = os.path.join(path, "checkpoints")
        for directory in (path, checkpoints) if os.path.isdir(checkpoints) else (path,):
            fd, probe = tempfile.mkstemp(prefix=".gg_jax_write_test_", dir=directory)
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        where = path if directory == path else f"{path} ({directory})"
        raise WorkdirError(f"Cannot write to the workdir {where}: {e.strerror or e}. {hint}") from None
