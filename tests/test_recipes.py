"""The recipes the authors ran, fact by fact: each test's docstring quotes the anchor's script
line it pins (csqlwang/3G-Net@bf3484d, jiangtaoxie/fast-MPN-COV@c430c78), and reads the fact
from what the trainer builds (the schedule, the optimizer and its state, the train step)."""

import importlib
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gg_jax.training import optim, steps, validation
from gg_jax.training import state as state_lib
from tests import runs
from tests.reference import torchvision_transforms as tv


def _config(name):
    return importlib.import_module(f"configs.{name}").get_config()


def _lr_by_epoch(config, num_epochs, steps_per_epoch=7):
    """The learning rate of the first step of each epoch, from the schedule `optim.create` builds."""
    _, schedule = optim.create(config, steps_per_epoch=steps_per_epoch, num_train_steps=num_epochs * steps_per_epoch)
    return [float(schedule(e * steps_per_epoch)) for e in range(num_epochs)]


@pytest.mark.parametrize("name", ["imagenet_r50", "imagenet_r101"])
def test_imagenet_schedule(name):
    """`lr = args.lr * (0.1 ** (epoch // 30))`, 115 epochs, lr 0.1 at batch 256
    (3G-Net Train-ImageNet.py:L314-L321; scripts/ImageNet/train.sh:L13-L22)."""
    config = _config(name)
    assert config.num_epochs == 115 and config.batch_size == 256 and config.learning_rate == 0.1
    got = _lr_by_epoch(config, 115)
    assert all(math.isclose(lr, 0.1 * 0.1 ** (e // 30), rel_tol=1e-5) for e, lr in enumerate(got)), got


@pytest.mark.parametrize("name", ["places365_r50", "places365_r101"])
def test_places365_schedule(name):
    """`#lr = args.lr * (0.1 ** (epoch // 30))` commented out; `if epoch > 30: lr *= 0.1`, and
    again for `> 40`, `> 45`, `> 50` (0-based epochs), 55 epochs
    (3G-Net Train-Places365.py:L314-L331; scripts/Places365/train.sh:L13-L22)."""
    config = _config(name)
    assert config.num_epochs == 55 and config.eval.ten_crop
    got = _lr_by_epoch(config, 55)
    expected = [0.1 * 0.1 ** sum(e > t for t in (30, 40, 45, 50)) for e in range(55)]
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert got[30] == pytest.approx(0.1) and got[31] == pytest.approx(0.01) and got[54] == pytest.approx(1e-5)


PARAMS = {
    "conv1": {"kernel": jnp.ones((3,))},
    "bn1": {"scale": jnp.ones((3,))},
    "layer1_0": {"conv1": {"kernel": jnp.ones((3,))}},
    "layer2_0": {"conv1": {"kernel": jnp.ones((3,))}},
    "head": {"reduce": {"kernel": jnp.ones((3,))}},
    "fc": {"kernel": jnp.ones((3,)), "bias": jnp.ones((3,))},
}


def _decay_step(config, params=PARAMS):
    """One step of the config's optimizer with zero gradients: each parameter's update is
    -lr * weight_decay * p (PyTorch SGD's first step), so lr * wd per group is readable from it."""
    tx, _ = optim.create(config, steps_per_epoch=10, num_train_steps=100)
    grads = jax.tree.map(jnp.zeros_like, params)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    return jax.tree.map(lambda u, p: float(-u[0] / p[0]), updates, params), state


@pytest.mark.parametrize("name", ["cub200_r50", "cars196_r50", "aircraft_r50"])
def test_fine_grained_rates_and_decay(name):
    """fast-MPN-COV finetune.sh:L50-L66 (`lr=1.2e-3`, `classifier_factor=5`, batch 10, 100
    epochs) with `weight_decay=1e-3` never passed to main.py (finetune.sh:L84-L122), so main.py's
    `--weight-decay 1e-4` applies (main.py:L47-L48); param groups `features` and `representation`
    at lr, `classifier` at lr * classifier_factor, all with that decay (main.py:L141-L148)."""
    config = _config(name)
    assert (config.batch_size, config.num_epochs, config.lr_schedule) == (10, 100, "constant")
    lr_times_wd, state = _decay_step(config)
    for module in ("conv1", "bn1", "layer1_0", "layer2_0", "head"):
        assert jax.tree.leaves(lr_times_wd[module]) == pytest.approx([1.2e-3 * 1e-4]), module
    assert jax.tree.leaves(lr_times_wd["fc"]) == pytest.approx([5 * 1.2e-3 * 1e-4] * 2)
    rates = {
        g: float(s.inner_state[1].hyperparams["learning_rate"]) for g, s in state.inner_states.items() if g != "frozen"
    }
    assert rates == pytest.approx({"backbone": 1.2e-3, "head": 6e-3})
    assert config.eval.mirror_crop  # CenterCropWithFlip, imagepreprocess.py:L8-L40.


def test_freeze_stops_updates_and_decay_not_the_batch_statistics():
    """fast-MPN-COV's `--freezed-layer N`: `requires_grad = False` on the first N children of
    `features` (model_init.py:L46-L56), nothing else, so their BatchNorm layers still run in
    training mode and update their running statistics (main.py:L276-L277)."""
    config = runs.tiny_config(freeze=("conv1", "bn1", "layer1"), weight_decay=0.1)
    lr_times_wd, state = _decay_step(config)
    for module in ("conv1", "bn1", "layer1_0"):
        assert jax.tree.leaves(lr_times_wd[module]) == [0.0], module  # no update, no decay
    assert lr_times_wd["layer2_0"]["conv1"]["kernel"] > 0 and lr_times_wd["fc"]["kernel"] > 0
    assert optim.param_groups(PARAMS, frozen=config.freeze)["layer1_0"]["conv1"]["kernel"] == "frozen"
    # A train step of the tiny model: frozen kernels unchanged, their BatchNorm statistics moved.
    model = state_lib.create_model(config.model, 10)
    tx, _ = optim.create(config, steps_per_epoch=10, num_train_steps=10)
    fresh = state_lib.create_train_state(model, tx, rng=jax.random.PRNGKey(0))
    images = jax.random.normal(jax.random.PRNGKey(1), (4, 48, 48, 3))
    batch = {"image": images, "label": jnp.arange(4, dtype=jnp.int32)}
    new, _ = jax.jit(lambda s, b: steps.train_step(s, b, model=model, tx=tx))(fresh, batch)
    np.testing.assert_array_equal(
        new.params["layer1_0"]["conv1"]["kernel"], fresh.params["layer1_0"]["conv1"]["kernel"]
    )
    assert not np.array_equal(new.params["layer2_0"]["conv1"]["kernel"], fresh.params["layer2_0"]["conv1"]["kernel"])
    assert not np.array_equal(new.batch_stats["bn1"]["mean"], fresh.batch_stats["bn1"]["mean"])
    with pytest.raises(validation.ConfigError, match=r"config.freeze=.*'layer9' is not a module of resnet18_3g"):
        from gg_jax.training import trainer

        trainer.train_and_evaluate(runs.tiny_config(freeze=("layer9",)), "/nonexistent/never-created")


class _Mlp(nn.Module):
    """No BatchNorm: the mean of the micro-batches' gradients is the batch's gradient."""

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        return nn.Dense(5)(nn.relu(nn.Dense(8)(x.reshape(x.shape[0], -1))))


def test_gradient_accumulation_is_the_whole_batch_step():
    """`grad_accum_steps=k`: one update with the mean gradient of k micro-batches; without
    BatchNorm that is the whole batch's step, to float32 rounding."""
    model = _Mlp()
    tx = optim.create_optimizer(0.1, momentum=0.9, weight_decay=1e-4)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 3)))["params"]
    state = state_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats={}, opt_state=tx.init(params)
    )
    batch = {
        "image": jax.random.normal(jax.random.PRNGKey(1), (12, 2, 2, 3)),
        "label": jnp.arange(12, dtype=jnp.int32) % 5,
    }
    whole, m1 = jax.jit(lambda s, b: steps.train_step(s, b, model=model, tx=tx))(state, batch)
    for k in (2, 3):
        accumulated, mk = jax.jit(lambda s, b, k=k: steps.train_step(s, b, model=model, tx=tx, accum_steps=k))(
            state, batch
        )
        for a, b in zip(jax.tree.leaves(accumulated.params), jax.tree.leaves(whole.params)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        assert float(mk["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-5)
        assert float(mk["top1_error"]) == pytest.approx(float(m1["top1_error"]))
    with pytest.raises(validation.ConfigError, match="grad_accum_steps=0 must be an integer >= 1"):
        validation.check_train_config(runs.tiny_config(grad_accum_steps=0))


@pytest.mark.parametrize(
    "name, anchor",
    [
        ("cub200_r50", lambda img: tv.tv_center_crop(tv.tv_resize(img, 448), 448)),
        ("cars196_r50", lambda img: tv.tv_resize(img, (448, 448))),
        ("aircraft_r50", lambda img: tv.tv_center_crop(tv.tv_resize(img, (512, 512)), 448)),
    ],
)
def test_fine_grained_eval_transform(name, anchor):
    """fast-MPN-COV's `evaluate_transforms`: CUB `Resize(448)` + `CenterCropWithFlip(448)`,
    Aircraft `Resize((512, 512))` + `CenterCropWithFlip(448)`, Cars `Resize((448, 448))` +
    `CenterCropWithFlip(448)` (imagepreprocess.py:L44-L101): the view and the same view of the
    horizontally flipped image (flip, then crop: imagepreprocess.py:L8-L40), from the transform
    the input pipeline builds for the config, to 1 grey level."""
    import types

    from PIL import Image

    from gg_jax.data import per_example, testing

    config = _config(name)
    source = types.SimpleNamespace(eval_mode="crop", info=types.SimpleNamespace(name=config.dataset.name))
    transform, shape = per_example.eval_transform(
        source,
        config.image_size,
        config.eval.resize_size,
        config.eval.ten_crop,
        config.eval.resize_mode,
        config.eval.mirror_crop,
    )
    assert shape == (2, 448, 448, 3)
    for h, w in ((375, 500), (500, 333)):
        jpeg = testing.encode_image(testing.random_photo(np.random.default_rng(h), h, w))
        views = transform(jpeg, None)["image"]
        image = tv.pil_open(jpeg)
        for view, ref in zip(views, (anchor(image), anchor(image.transpose(Image.FLIP_LEFT_RIGHT)))):
            assert np.abs(view.astype(np.int32) - np.asarray(ref, np.int32)).max() <= 1
