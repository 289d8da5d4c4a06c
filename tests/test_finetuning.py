"""The fine-grained fine-tuning recipes: configs on mocked TFDS data and on an image folder,
per-group learning rates on the optimizer state (the transforms: test_data_preprocessing.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import test_training_common as common

from gg_jax import models, variables_io
from gg_jax.training import optim, trainer

# The recipes as they are, but ResNet-18, small images and batches, a few steps.
SMALL = dict(
    model__name="resnet18_3g",
    model__num_blocks=1,
    image_size=48,
    dataset__train_resize_size=56,
    eval__resize_size=56,
    batch_size=4,
    eval__batch_size=4,
    num_train_steps=2,
    checkpoint_every_steps=-1,
    # tfds.testing.mock_data swaps the file system while a pipeline is built; no background save then.
    async_checkpoints=False,
)


def _pretrained(tmp_path):
    """'ImageNet' variables of the small model (10 classes), as the converter writes them."""
    model = models.create("resnet18_3g", num_classes=10, reduction_dim=16, num_blocks=1)
    variables = jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(123), jnp.zeros((1, 48, 48, 3))))
    path = str(tmp_path / "pretrained")
    variables_io.save_variables(path, variables, {"model": "resnet18_3g", "num_classes": 10})
    return path, variables


def _group_learning_rates(opt_state):
    """{'backbone': lr, 'head': lr} of the last step, read from the optimizer state."""
    return {
        group: float(state.inner_state[1].hyperparams["learning_rate"])
        for group, state in opt_state.inner_states.items()
    }


def _check_run(result, config, pretrained, num_classes, workdir):
    base = config.learning_rate * config.batch_size / 256
    assert result.step == 2 and np.isfinite(result.eval_metrics["loss"])
    lrs = _group_learning_rates(result.state.opt_state)
    np.testing.assert_allclose([lrs["backbone"], lrs["head"]], [base, 5 * base], rtol=1e-6)
    labels = optim.param_groups(result.state.params, config.head_lr_modules)
    assert labels["fc"]["kernel"] == "head" and labels["head"]["reduce"]["layer_reduce"]["kernel"] == "head"
    assert labels["layer1_0"]["conv1"]["kernel"] == "backbone"
    params = common.load_params(workdir)
    assert params["fc/kernel"].shape == (16 * 17 // 2, num_classes)  # re-initialised for the dataset
    assert not np.array_equal(params["layer1_0/conv1/kernel"], pretrained["params"]["layer1_0"]["conv1"]["kernel"])


def test_cub_and_cars_configs_fine_tune_from_pretrained_on_mock_tfds(tmp_path):
    from gg_jax.data import testing

    path, pretrained = _pretrained(tmp_path)
    data_dir = tmp_path / "tfds"
    config = common.tiny_config("cub200_r50", init_from=path, dataset__data_dir=str(data_dir), **SMALL)
    assert config.dataset.name == "caltech_birds2011" and config.dataset.augment == "center_crop_flip"
    with testing.mock_tfds("caltech_birds2011", data_dir, image_size=(60, 80), train=12, test=6):
        result = trainer.train_and_evaluate(config, str(tmp_path / "cub"))
    assert result.eval_metrics["num_examples"] == 6
    _check_run(result, config, pretrained, 200, tmp_path / "cub")

    # Stanford Cars: the same recipe, its classes and transforms, read from TFDS.
    cars = common.tiny_config("cars196_r50", init_from=path, dataset__data_dir=str(data_dir), **SMALL)
    assert cars.dataset.augment == "square_center_crop_flip" and cars.eval.resize_mode == "shorter"
    with testing.mock_tfds("cars196", data_dir, image_size=(60, 80), train=12, test=6):
        from gg_jax import data

        info = data.get_dataset_info("cars196", str(data_dir))
        batch = next(
            iter(
                data.train_batches(
                    "cars196",
                    data_dir=str(data_dir),
                    global_batch_size=4,
                    image_size=48,
                    augment=cars.dataset.augment,
                    train_resize_size=56,
                )
            )
        )
    assert info.num_classes == 196 and info.eval_split == "test" and batch["image"].shape == (4, 48, 48, 3)


def test_aircraft_config_fine_tunes_from_an_image_folder(tmp_path):
    from gg_jax.data import testing

    path, pretrained = _pretrained(tmp_path)
    folder = testing.write_image_folder(tmp_path / "aircraft", train_per_class=4, val_per_class=2)["root"]
    config = common.tiny_config("aircraft_r50", init_from=path, dataset__data_dir=folder, **SMALL)
    assert config.dataset.name == "image_folder" and config.eval.resize_mode == "square"
    result = trainer.train_and_evaluate(config, str(tmp_path / "aircraft_run"))
    assert result.eval_metrics["num_examples"] == 6
    _check_run(result, config, pretrained, 3, tmp_path / "aircraft_run")


def test_grouped_optimizer_scales_the_head_update():
    """One SGD step without momentum or decay: the head's update is head_lr_factor times what the
    one-group optimizer gives, the backbone's is the same."""
    params = {"layer1_0": {"w": jnp.ones(3)}, "head": {"w": jnp.ones(2)}, "fc": {"kernel": jnp.ones((2, 2))}}
    grads = jax.tree.map(lambda p: 0.5 * jnp.ones_like(p), params)
    schedule = optax.constant_schedule(0.1)
    plain = optim.create_optimizer(schedule, momentum=0.0, weight_decay=0.0)
    grouped = optim.create_grouped_optimizer(schedule, 5.0, ("head", "fc"), momentum=0.0, weight_decay=0.0)
    want, _ = plain.update(grads, plain.init(params), params)
    got, state = grouped.update(grads, grouped.init(params), params)
    np.testing.assert_allclose(got["layer1_0"]["w"], want["layer1_0"]["w"])
    np.testing.assert_allclose(got["head"]["w"], 5 * want["head"]["w"])
    np.testing.assert_allclose(got["fc"]["kernel"], 5 * want["fc"]["kernel"])
    assert _group_learning_rates(state) == pytest.approx({"backbone": 0.1, "head": 0.5})
