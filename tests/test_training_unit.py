"""Training building blocks: optimizer vs torch.optim.SGD, schedules, recipes, steps, errors."""

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gg_jax import checkpoints, convert, data, errors, models, sharding
from gg_jax.checkpoints import training as run_checkpoints
from gg_jax.checkpoints import writer as checkpoint_writer
from gg_jax.training import optim, steps, trainer, validation
from gg_jax.training import state as state_lib
from tests import runs

# ----------------------------------------------------------------------------- optimizer


def test_sgd_matches_torch_sgd_with_weight_decay_on_every_parameter():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(4).astype(np.float32)}
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()} for _ in range(4)]
    lrs = [0.1, 0.1, 0.01, 0.01]  # A step decay between steps 2 and 3.

    tparams = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
    topt = torch.optim.SGD(list(tparams.values()), lr=lrs[0], momentum=0.9, weight_decay=1e-4)
    schedule = optax.piecewise_constant_schedule(0.1, {2: 0.1})
    tx = optim.create_optimizer(schedule, momentum=0.9, weight_decay=1e-4)
    jparams = jax.tree.map(jnp.asarray, params)
    opt_state = tx.init(jparams)
    for lr, g in zip(lrs, grads):
        for group in topt.param_groups:
            group["lr"] = lr
        for k, p in tparams.items():
            p.grad = torch.tensor(g[k])
        topt.step()
        updates, opt_state = tx.update(jax.tree.map(jnp.asarray, g), opt_state, jparams)
        jparams = optax.apply_updates(jparams, updates)
    for k in params:
        np.testing.assert_allclose(np.asarray(jparams[k]), tparams[k].detach().numpy(), rtol=1e-6, atol=1e-7)


def test_step_schedule_is_the_reference_one_and_scales_with_the_batch():
    spe = 10
    fn = optim.create_learning_rate_schedule(
        base_learning_rate=0.1, batch_size=512, steps_per_epoch=spe, num_train_steps=115 * spe, schedule="step"
    )
    # lr * 0.1 ** (epoch // 30), at twice the reference batch.
    for epoch in (0, 29, 30, 59, 60, 89, 90, 114):
        assert math.isclose(float(fn(epoch * spe)), 0.2 * 0.1 ** min(epoch // 30, 3), rel_tol=1e-5), epoch
    assert math.isclose(float(fn(30 * spe - 1)), 0.2, rel_tol=1e-6)

    warm = optim.create_learning_rate_schedule(
        base_learning_rate=0.4,
        batch_size=64,
        steps_per_epoch=spe,
        num_train_steps=100,
        schedule="cosine",
        warmup_epochs=1,
    )
    assert float(warm(0)) == 0.0 and math.isclose(float(warm(spe)), 0.1, rel_tol=1e-6)
    assert float(warm(100)) < 1e-6 and 0.0 < float(warm(50)) < 0.1
    with pytest.raises(ValueError, match="lr_schedule"):
        optim.create_learning_rate_schedule(
            base_learning_rate=0.1, batch_size=256, steps_per_epoch=1, num_train_steps=1, schedule="linear"
        )


# ----------------------------------------------------------------------------- configs


def _epochs_of_decays(config):
    return tuple(config.lr_boundaries_epochs)


@pytest.mark.parametrize(
    "name, model, dataset, epochs, ten_crop",
    [
        ("imagenet_r50", "resnet50_3g", "imagenet2012", 115, False),
        ("imagenet_r101", "resnet101_3g", "imagenet2012", 115, False),
        ("places365_r50", "resnet50_3g", "places365_small", 55, True),
        ("places365_r101", "resnet101_3g", "places365_small", 55, True),
    ],
)
def test_reference_recipes(name, model, dataset, epochs, ten_crop):
    import importlib

    c = importlib.import_module(f"configs.{name}").get_config()
    assert (c.model.name, c.dataset.name, c.num_epochs, c.eval.ten_crop) == (model, dataset, epochs, ten_crop)
    assert (c.batch_size, c.learning_rate, c.momentum, c.weight_decay) == (256, 0.1, 0.9, 1e-4)
    assert (c.lr_schedule, c.lr_decay_factor, c.warmup_epochs, c.nesterov) == ("step", 0.1, 0.0, False)
    # ImageNet: "/10 every 30 epochs"; Places365: after epochs 30, 40, 45, 50 (tests/test_recipes.py).
    assert _epochs_of_decays(c) == ((31, 41, 46, 51) if "places" in name else (30, 60, 90))
    assert c.dataset.augment == "inception_crop" and c.image_size == 224 and c.eval.resize_size == 256
    assert c.num_train_steps <= 0 and c.model.dtype in (None, "float32")
    assert not c.model.get("dropout_rate")  # The reference notes train without dropout.


@pytest.mark.parametrize(
    "name", ["default", "demo", "finetune_folder", "imagenet_r50", "imagenet_r101", "places365_r50", "places365_r101"]
)
def test_configs_have_the_contract_fields(name):
    import importlib

    c = importlib.import_module(f"configs.{name}").get_config()
    for field in (
        "model.name",
        "dataset.name",
        "dataset.data_dir",
        "batch_size",
        "num_epochs",
        "num_train_steps",
        "learning_rate",
        "model.dtype",
        "seed",
    ):
        node = c
        for part in field.split("."):
            assert part in node, f"{name}: no config field {field}"
            node = node[part]


def test_num_train_steps_overrides_epochs():
    info = data.get_dataset_info("digits")
    c = runs.tiny_config(batch_size=64, num_epochs=2.0, num_train_steps=-1)
    assert trainer.num_train_steps(c, info) == 2 * (1437 // 64)
    c.num_train_steps = 7
    assert trainer.num_train_steps(c, info) == 7


# ----------------------------------------------------------------------------- steps


class _Linear(nn.Module):
    """A tiny 'model' with the linen interface of gg_jax.models."""

    num_classes: int = 7

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


def test_eval_step_counts_masked_examples_once_and_averages_ten_crops():
    model = _Linear()
    rng = np.random.default_rng(0)
    images = rng.standard_normal((6, 10, 2, 2, 3)).astype(np.float32)
    labels = np.array([0, 1, 2, 3, 4, 5], np.int32)
    mask = np.array([True, True, True, True, False, False])
    variables = model.init(jax.random.PRNGKey(0), images[:, 0])
    out = steps.eval_step(variables, {"image": images, "label": labels, "mask": mask}, model=model)

    logits = np.stack([np.asarray(model.apply(variables, images[:, k])) for k in range(10)], 1).mean(1)
    top5 = np.argsort(-logits, -1)[:, :5]
    expect_top1 = ((logits.argmax(-1) == labels) & mask).sum()
    expect_top5 = ((top5 == labels[:, None]).any(-1) & mask).sum()
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expect_loss = -log_probs[np.arange(6), labels][mask].sum()
    assert float(out["count"]) == 4
    assert float(out["top1_correct"]) == expect_top1 and float(out["top5_correct"]) == expect_top5
    np.testing.assert_allclose(float(out["loss_sum"]), expect_loss, rtol=1e-5)


def test_train_step_half_precision_with_dropout():
    """bf16 compute keeps float32 parameters; dropout draws a new mask per step (needs the rng)."""
    config = runs.tiny_config(model__dtype="bfloat16", model__dropout_rate=0.5, batch_size=8)
    model = trainer.create_model(config, 10)
    assert model.dtype == jnp.bfloat16 and steps.needs_dropout_rng(model)
    tx = optim.create_optimizer(0.1)
    mesh = sharding.make_mesh()
    abstract = state_lib.abstract_train_state(model, tx)
    state_sharding = sharding.replicated_tree(abstract, mesh)
    step_fn = steps.jit_train_step(model, tx, mesh, state_sharding, seed=0)
    batch = next(data.create_train_iterator("digits", global_batch_size=8, image_size=48, dtype=jnp.bfloat16))
    assert batch["image"].dtype == jnp.bfloat16

    def fresh(step):
        s = state_lib.create_train_state(model, tx, rng=jax.random.PRNGKey(0), sharding=state_sharding)
        return s.replace(step=jnp.asarray(step, jnp.int32))

    new0, metrics = step_fn(fresh(0), batch)
    new1, _ = step_fn(fresh(1), batch)
    assert int(new0.step) == 1 and np.isfinite(float(metrics["loss"]))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(new0.params))
    # Same state, same batch, only the step (hence the dropout mask) differs.
    diff = max(
        float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(new0.params), jax.tree.leaves(new1.params))
    )
    assert diff > 0.0


# ----------------------------------------------------------------------------- checks and errors


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(num_train_steps=0, num_epochs=0.0),
            "nothing to train: config.num_train_steps=0 and config.num_epochs=0.0",
        ),
        (dict(num_train_steps=-10, num_epochs=-1.0), "nothing to train"),
        (dict(learning_rate=0.0), "config.learning_rate=0.0 must be > 0"),
        (dict(learning_rate=-0.1), "config.learning_rate=-0.1 must be > 0"),
        (dict(learning_rate=float("nan")), "config.learning_rate=nan must be > 0"),
        (dict(batch_size=0), "config.batch_size=0 must be a positive integer"),
        (dict(batch_size=-16), "config.batch_size=-16 must be a positive integer"),
        (dict(eval__batch_size=-1), "config.eval.batch_size=-1 must be a positive integer, or 0"),
        (dict(image_size=0), "config.image_size=0 must be a positive integer"),
        (dict(lr_schedule="linear"), "config.lr_schedule='linear' is not one of step, cosine, constant"),
        (dict(dataset__augment="mixup"), "config.dataset.augment='mixup' is not one of inception_crop, scale_aug"),
        (dict(keep_checkpoints=0), "config.keep_checkpoints=0 must be >= 1"),
        (dict(keep_checkpoints=-1), "config.keep_checkpoints=-1 must be >= 1"),
        (dict(warmup_epochs=-1.0), "config.warmup_epochs=-1.0 must be >= 0"),
        (dict(momentum=1.0), "config.momentum=1.0 must be in [0, 1)"),
        (dict(weight_decay=-1e-4), "config.weight_decay=-0.0001 must be >= 0"),
        (dict(lr_decay_factor=0.0), "config.lr_decay_factor=0.0 must be > 0"),
        (dict(head_lr_factor=0.0), "config.head_lr_factor=0.0 must be > 0"),
        (dict(dataset__train_resize_size=40), "config.dataset.train_resize_size=40 must be an integer >= image_size"),
        (dict(eval__resize_mode="crop"), "config.eval.resize_mode='crop' is not one of shorter, square"),
        (dict(eval__ten_crop=True, eval__mirror_crop=True), "ten_crop and config.eval.mirror_crop exclude each other"),
    ],
)
def test_nonsense_configs_are_refused_before_anything_is_built(tmp_path, overrides, message):
    config = runs.tiny_config(**overrides)
    with pytest.raises(validation.ConfigError) as e:
        validation.check_train_config(config)
    assert message in str(e.value) and "\n" not in str(e.value)
    # The trainer checks first: no workdir, no model, no data.
    with pytest.raises(validation.ConfigError, match=re.escape(message)):
        trainer.train_and_evaluate(config, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_every_problem_is_in_the_one_line_and_sound_configs_pass():
    config = runs.tiny_config(learning_rate=-1.0, batch_size=0, lr_schedule="poly")
    with pytest.raises(validation.ConfigError) as e:
        validation.check_train_config(config)
    assert all(f in str(e.value) for f in ("learning_rate=-1.0", "batch_size=0", "lr_schedule='poly'"))
    for name in ("default", "demo", "finetune_folder", "imagenet_r50", "places365_r101"):
        import importlib

        config = importlib.import_module(f"configs.{name}").get_config()
        validation.check_train_config(config)
        validation.check_eval_config(config)
    # Every field of config.model is an option of some model, so the config passes it straight through.
    all_options = {o for name in models.names() for o in models.options(name)}
    for name in ("default", "demo", "imagenet_r50"):
        import importlib

        fields = set(importlib.import_module(f"configs.{name}").get_config().model) - {"name"}
        assert fields <= all_options, fields - all_options
    config = runs.tiny_config(model__dropout_rate=0.2, model__last_stride=2, model__lam=0.5, model__hidden=8)
    model = trainer.create_model(config, 10)
    assert (model.dropout_rate, model.backbone.last_stride, model.head.lam, model.head.hidden) == (0.2, 2, 0.5, 8)


def test_user_errors_share_one_base_class():
    """What the entry points print as one line, without a traceback."""
    for cls in (
        validation.ConfigError,
        validation.WorkdirError,
        sharding.BatchSizeError,
        checkpoints.CheckpointMismatchError,
        checkpoints.CheckpointExistsError,
        checkpoints.WorkdirMismatchError,
        checkpoints.CheckpointNotFoundError,
        checkpoints.DamagedCheckpointError,
        checkpoints.CheckpointSaveError,
        data.DatasetNotFoundError,
        data.CorruptImageError,
        trainer.NonFiniteLossError,
    ):
        assert issubclass(cls, errors.UserError), cls
    assert issubclass(convert.UnsafeCheckpointError, errors.UserError)


def test_storage_errors_are_recognised_in_tensorstore_messages():
    """How a failed write reaches the trainer: an OSError, or TensorStore's ValueError text."""
    import errno

    tensorstore_error = ValueError(
        'RESOURCE_EXHAUSTED: Error writing "params.conv1.kernel/0" in OCDBT database at local file "/w/": '
        "Failed to write 23838720 bytes to file 5: No space left on device [os_error_code='28']"
    )
    assert checkpoint_writer.storage_error(tensorstore_error) == "No space left on device"
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert checkpoint_writer.storage_error(wrapped) == "Disk quota exceeded"
    assert checkpoint_writer.storage_error(ValueError("shapes do not match")) is None


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(sharding.BatchSizeError, match="config.batch_size must be a positive integer, got 0"):
        sharding.check_batch_size(0, 1)
    with pytest.raises(
        sharding.BatchSizeError,
        match="config.eval.batch_size=12 is not divisible by the number of devices, 8 .*eval.batch_size=8",
    ):
        sharding.check_batch_size(12, 8, field="eval.batch_size")
    with pytest.raises(validation.ConfigError, match="Unknown model name 'resnet50_4g'.*resnet50_3g"):
        trainer.train_and_evaluate(runs.tiny_config(model__name="resnet50_4g"), str(tmp_path / "a"))
    with pytest.raises(validation.ConfigError, match=r"Unknown option\(s\) \['colour'\]"):
        trainer.train_and_evaluate(runs.tiny_config(model__colour=3), str(tmp_path / "b"))
    # Options of another head (the demo's num_blocks) are refused for a baseline, naming the valid ones.
    with pytest.raises(
        validation.ConfigError, match=r"Unknown option\(s\) \['num_blocks'\] for model 'resnet18_isqrt'"
    ):
        trainer.train_and_evaluate(runs.tiny_config(model__name="resnet18_isqrt"), str(tmp_path / "e"))
    with pytest.raises(data.DatasetNotFoundError, match="tfds build imagenet2012"):
        trainer.train_and_evaluate(
            runs.tiny_config(dataset__name="imagenet2012", dataset__data_dir=str(tmp_path)), str(tmp_path / "c")
        )
    with pytest.raises(data.DatasetNotFoundError, match="train/<class_name>"):
        trainer.train_and_evaluate(
            runs.tiny_config(dataset__name="image_folder", dataset__data_dir=str(tmp_path)), str(tmp_path / "d")
        )
    assert not (tmp_path / "a" / "checkpoints").exists()


def test_check_resumable_names_what_differs():
    shapes = {"params/head/reduce/layer_reduce/kernel": (1, 1, 512, 16), "params/fc/kernel": (136, 10)}
    saved = run_checkpoints.run_metadata(
        model="resnet18_3g",
        model_options={"reduction_dim": 16, "matmul_precision": "highest", "num_iters": 5},
        num_classes=10,
        dataset="digits",
        image_size=48,
        batch_size=16,
    )
    # Options that change no variable's shape may differ: they are returned, for a log line.
    precision = {**saved, "model_options": {"reduction_dim": 16, "matmul_precision": "tf32_3x", "num_iters": 7}}
    changed = run_checkpoints.check_resumable(saved, precision, shapes, shapes, "W")
    assert changed == {"matmul_precision": ("highest", "tf32_3x"), "num_iters": (5, 7)}
    other = {**saved, "model": "resnet18_isqrt", "model_options": {}}
    with pytest.raises(checkpoints.WorkdirMismatchError, match="resnet18_3g.*resnet18_isqrt.*new --workdir"):
        run_checkpoints.check_resumable(saved, other, shapes, shapes, "W")
    wider = {**shapes, "params/head/reduce/layer_reduce/kernel": (1, 1, 512, 32)}
    with pytest.raises(
        checkpoints.WorkdirMismatchError, match=r"layer_reduce/kernel: \(1, 1, 512, 16\) vs \(1, 1, 512, 32\)"
    ):
        run_checkpoints.check_resumable(saved, {**saved, "model_options": {"reduction_dim": 32}}, shapes, wider, "W")
    for field, value in (("dataset", "imagenet2012"), ("image_size", 64)):
        with pytest.raises(checkpoints.WorkdirMismatchError, match=f"{field.replace('_', ' ')}.*init_from=W"):
            run_checkpoints.check_resumable(saved, {**saved, field: value}, shapes, shapes, "W")


def test_merge_keeps_the_classifier_on_a_class_count_mismatch_and_lists_mismatches():
    target = {
        "params": {"conv": {"kernel": np.zeros((3, 3))}, "fc": {"kernel": np.zeros((4, 5)), "bias": np.zeros(5)}},
        "batch_stats": {"bn": {"mean": np.zeros(3)}},
    }
    source = {
        "params": {"conv": {"kernel": np.ones((3, 3))}, "fc": {"kernel": np.ones((4, 9)), "bias": np.ones(9)}},
        "batch_stats": {"bn": {"mean": np.ones(3)}},
    }
    merged, fresh = checkpoints.merge(target, source, keep_on_shape_mismatch=("fc",))
    assert (merged["params"]["conv"]["kernel"] == 1).all() and (merged["batch_stats"]["bn"]["mean"] == 1).all()
    assert (merged["params"]["fc"]["kernel"] == 0).all() and sorted(fresh) == ["params/fc/bias", "params/fc/kernel"]
    source["params"]["conv"]["kernel"] = np.ones((2, 3))
    del source["batch_stats"]["bn"]
    with pytest.raises(
        checkpoints.CheckpointMismatchError,
        match="missing in the pretrained variables: batch_stats/bn/mean.*\n.*shape mismatch: params/conv/kernel",
    ):
        checkpoints.merge(target, source, keep_on_shape_mismatch=("fc",))
    # A partial source (a backbone alone) keeps what it lacks; what it has must fit.
    source = {"params": {"conv": {"kernel": np.ones((3, 3))}}}
    merged, kept = checkpoints.merge(target, source, partial_source=True)
    assert (merged["params"]["conv"]["kernel"] == 1).all() and "batch_stats/bn/mean" in kept
