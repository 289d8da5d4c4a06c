"""The fine-grained fine-tuning recipes: configs on mocked TFDS data and on an image folder,
per-group learning rates on the optimizer state (the transforms: test_data_preprocessing.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gg_jax.training import optim, trainer
from tests import runs


def _pretrained(tmp_path):
    path = tmp_path / "pretrained"
    return str(path), runs.pretrained(path)


def _group_learning_rates(opt_state):
    """{'backbone': lr, 'head': lr} of the last step, read from the optimizer state."""
    return {
        group: float(state.inner_state[1].hyperparams["learning_rate"])
        for group, state in opt_state.inner_states.items()
        if group != "frozen"
    }


def _check_run(result, config, pretrained, num_classes, workdir):
    base = config.learning_rate * config.batch_size / 256
    assert result.step == 2 and np.isfinite(result.eval_metrics["loss"])
    lrs = _group_learning_rates(result.state.opt_state)
    np.testing.assert_allclose([lrs["backbone"], lrs["head"]], [base, 5 * base], rtol=1e-6)
    labels = optim.param_groups(result.state.params, config.head_lr_modules)
    # fast-MPN-COV's classifier_factor: the classifier alone; the pooling head learns at lr.
    assert labels["fc"]["kernel"] == "head" and labels["head"]["reduce"]["layer_reduce"]["kernel"] == "backbone"
    assert labels["layer1_0"]["conv1"]["kernel"] == "backbone"
    params = runs.load_params(workdir)
    assert params["fc/kernel"].shape == (16 * 17 // 2, num_classes)  # re-initialised for the dataset
    assert not np.array_equal(params["layer1_0/conv1/kernel"], pretrained["params"]["layer1_0"]["conv1"]["kernel"])


def test_cub_and_cars_configs_fine_tune_from_pretrained_on_mock_tfds(tmp_path):
    from gg_jax.data import testing

    path, pretrained = _pretrained(tmp_path)
    data_dir = tmp_path / "tfds"
    config = runs.small_config("cub200_r50", init_from=path, dataset__data_dir=str(data_dir))
    assert config.dataset.name == "caltech_birds2011" and config.dataset.augment == "center_crop_flip"
    with testing.mock_tfds("caltech_birds2011", data_dir, image_size=(60, 80), train=12, test=6):
        result = trainer.train_and_evaluate(config, str(tmp_path / "cub"))
    assert result.eval_metrics["num_examples"] == 6
    _check_run(result, config, pretrained, 200, tmp_path / "cub")

    # Stanford Cars: the same recipe, its classes and transforms, read from TFDS.
    cars = runs.small_config("cars196_r50", init_from=path, dataset__data_dir=str(data_dir))
    assert cars.dataset.augment == "square_center_crop_flip" and cars.eval.resize_mode == "square"
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
    config = runs.small_config("aircraft_r50", init_from=path, dataset__data_dir=folder)
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


def test_two_stage_fine_tuning_classifier_then_everything(tmp_path):
    """fast-MPN-COV's two_stage_finetune.sh: stage 1 trains the classifier alone (every feature
    layer frozen, `freeze_layer=30` of vgg16's 30 children), stage 2 everything, starting from
    stage 1 (finetune/two_stage_finetune.sh:L51-L68, L145-L176); docs/finetuning.md gives the commands."""
    from gg_jax.data import testing

    path, pretrained = _pretrained(tmp_path)
    folder = testing.write_image_folder(tmp_path / "birds", train_per_class=4, val_per_class=2)["root"]
    everything_but_fc = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "head")
    stage1 = runs.small_config(
        "aircraft_r50", init_from=path, dataset__data_dir=folder, freeze=everything_but_fc, head_lr_factor=1.0
    )
    trainer.train_and_evaluate(stage1, str(tmp_path / "stage1"))
    after1 = runs.load_params(tmp_path / "stage1")
    before = {k: v for k, v in runs.flat(pretrained["params"]).items()}
    for key, value in after1.items():
        if key.startswith("fc/"):
            assert value.shape[-1] == 3  # the dataset's classifier, trained
        else:
            np.testing.assert_array_equal(value, before[key], err_msg=key)  # frozen
    stage2 = runs.small_config("aircraft_r50", init_from=str(tmp_path / "stage1"), dataset__data_dir=folder)
    trainer.train_and_evaluate(stage2, str(tmp_path / "stage2"))
    after2 = runs.load_params(tmp_path / "stage2")
    assert not np.array_equal(after2["layer1_0/conv1/kernel"], after1["layer1_0/conv1/kernel"])
    assert not np.array_equal(after2["fc/kernel"], after1["fc/kernel"])
