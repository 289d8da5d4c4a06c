"""The ImageNet and Places365 configs end to end on mocked TFDS data, with a small backbone."""

import pathlib

import numpy as np
import pytest

from gg_jax import data
from gg_jax.training import trainer
from tests import runs


@pytest.mark.parametrize(
    "config_name, dataset, num_classes, ten_crop",
    [
        ("imagenet_r50", "imagenet2012", 1000, False),
        ("places365_r50", "places365_small", 365, True),
    ],
)
def test_reference_config_runs_on_mock_tfds(tmp_path, config_name, dataset, num_classes, ten_crop):
    from gg_jax.data import testing

    data_dir = tmp_path / "tfds"
    # The recipe as it is, but ResNet-18 (--config.model.name=resnet18_3g), small images and batches.
    config = runs.small_config(
        config_name, num_train_steps=3, batch_size=8, checkpoint_every_steps=2, dataset__data_dir=str(data_dir)
    )
    assert config.eval.ten_crop == ten_crop and config.dataset.name == dataset
    workdir = tmp_path / "w"
    with testing.mock_tfds(dataset, data_dir, image_size=(60, 72), train=24, validation=7):
        result = trainer.train_and_evaluate(config, str(workdir))
    assert result.step == 3 and not result.preempted
    # Every one of the 7 validation images once (two padded batches of 4).
    assert result.eval_metrics["num_examples"] == 7
    assert 0.0 <= result.eval_metrics["top1_error"] <= 1.0 and np.isfinite(result.eval_metrics["loss"])
    assert runs.checkpoint_steps(workdir) == [2, 3]
    params = runs.load_params(workdir)
    assert params["fc/kernel"].shape == (16 * 17 // 2, num_classes)
    assert all(np.isfinite(v).all() for v in params.values())

    scalars = runs.read_scalars(workdir)
    for tag in ("train/loss", "train/top1_error", "train/learning_rate"):
        assert sorted(scalars[tag]) == [1, 2, 3], tag
    # Speeds are measured from the end of the first step: compilation is not in them.
    for tag in ("train/images_per_sec", "steps_per_sec"):
        assert sorted(scalars[tag]) == [2, 3] and all(v > 0 for v in scalars[tag].values()), tag
    for tag in ("eval/top1_error", "eval/top5_error"):
        assert list(scalars[tag]) == [3] and 0.0 <= scalars[tag][3] <= 1.0
    # Reference schedule (no decay within 3 steps), linearly scaled: 0.1 * 8 / 256.
    assert all(abs(v - 0.1 * 8 / 256) < 1e-9 for v in scalars["train/learning_rate"].values())


def test_finetune_folder_config_starts_from_pretrained_variables(tmp_path):
    """configs/finetune_folder.py: every variable from `init_from` but the classifier, which
    is re-initialised for the folder's 3 classes (learning rate 1e-30: the step changes
    nothing measurable). Then a corrupt evaluation image stops the next run in one line
    naming it, after that run's checkpoint is saved."""
    from flax import traverse_util

    from gg_jax.data import testing

    pretrained = runs.pretrained(tmp_path / "pretrained")
    folder = testing.write_image_folder(tmp_path / "images", train_per_class=4, val_per_class=2)["root"]

    config = runs.small_config(
        "finetune_folder",
        batch_size=6,
        eval__batch_size=6,
        num_train_steps=1,
        learning_rate=1e-30,
        dataset__data_dir=folder,
        init_from=str(tmp_path / "pretrained"),
        checkpoint_every_steps=1,
    )
    result = trainer.train_and_evaluate(config, str(tmp_path / "w"))
    assert result.step == 1 and result.eval_metrics["num_examples"] == 6
    params = runs.load_params(tmp_path / "w")
    expected = traverse_util.flatten_dict(pretrained["params"], sep="/")
    assert params["fc/kernel"].shape == (136, 3) and expected["fc/kernel"].shape == (136, 10)
    for key, value in params.items():
        if not key.startswith("fc/"):
            np.testing.assert_allclose(value, expected[key], rtol=1e-6, atol=1e-20, err_msg=key)

    # A validation image goes bad: found at the next evaluation, named in one line, after
    # the checkpoint of that step was saved.
    bad = sorted(pathlib.Path(folder, "val", "dog").glob("*.jpg"))[0]
    bad.write_bytes(bad.read_bytes()[:40] + b"not the rest of a JPEG" * 50)
    config.num_train_steps = 2
    with pytest.raises(data.CorruptImageError) as e:
        trainer.train_and_evaluate(config, str(tmp_path / "w"))
    message = str(e.value)
    assert e.value.path == str(bad) and str(bad) in message and "\n" not in message, message
    assert "while evaluating step 2" in message and "checkpoint of step 2 is kept" in message, message
    assert e.value.__cause__ is None and e.value.__suppress_context__
    assert runs.checkpoint_steps(tmp_path / "w") == [1, 2]
