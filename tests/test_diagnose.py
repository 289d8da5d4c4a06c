"""gg_jax.diagnose: per-channel generalized Gaussian fits of a model's activations (the paper's Figure 1).

The end-to-end tests diagnose a tiny model trained for one step (the training tests' tiny demo),
once through the Python function with TensorBoard output into the run, once through the
command line on image files; the fitting itself is checked on synthetic activations of
ImageNet size (2 images x 1024 channels x 14 x 14 positions).
"""

import json
import pathlib

import numpy as np
import pytest
import test_training_common as common
from scipy import stats

from gg_jax import diagnose, mggd

pytest.importorskip("matplotlib")
pytest.importorskip("tensorflow")


def test_fit_channels_vectorised_with_degenerate_channels():
    rng = np.random.default_rng(0)
    b, c, n = 2, 1024, 196
    values = np.abs(rng.standard_normal((b, c, n))) * (rng.random((b, c, n)) < 0.6)  # ReLU-like: 40 % zeros
    values[:, 0] = 0.0  # dead channel
    values[:, 1, 3:] = 0.0  # three non-zero values: too few
    values[:, 2] = np.abs(stats.gennorm(0.8, scale=0.5).rvs(size=(b, n), random_state=1))  # beta = 0.4
    values = values.astype(np.float32)
    fits = diagnose.fit_channels(values)
    assert fits.beta.shape == fits.status.shape == (b, c)
    assert np.all(fits.status[:, 0] == diagnose.ALL_ZERO) and np.all(fits.status[:, 1] == diagnose.TOO_FEW)
    assert np.all(fits.status[:, 2:] == diagnose.FITTED) and np.all(np.isnan(fits.beta[:, :2]))
    np.testing.assert_allclose(fits.zero_share[:, 0], 1.0)
    np.testing.assert_array_equal(fits.num_values, (values > 0).sum(-1))
    np.testing.assert_allclose(fits.beta[:, 2], 0.4, rtol=0.25)  # 196 values
    # Half-normal channels: beta around 1, and in the mean very close.
    assert abs(np.median(fits.beta[:, 3:]) - 1.0) < 0.1
    assert np.all(fits.ll_gain[fits.status == diagnose.FITTED] > -1e-5)  # the GGD contains the Gaussian
    assert np.mean(fits.converged[:, 2:]) > 0.97
    # The Gaussian is mggd's beta = 1 fit; the gain is the difference of mean log-likelihoods.
    x = values[0, 2][values[0, 2] > 0][None, :, None]
    gauss = mggd.fit(x, beta=1.0)
    np.testing.assert_allclose(fits.variance[0, 2], gauss.delta[0], rtol=1e-5)
    ggd = mggd.MGGD(np.ones((1, 1, 1), np.float32), fits.beta[0, 2:3], fits.delta[0, 2:3])
    gain = np.mean(mggd.log_prob(x, ggd)) - np.mean(mggd.log_prob(x, gauss))
    np.testing.assert_allclose(fits.ll_gain[0, 2], gain, rtol=1e-3, atol=1e-5)
    summary = diagnose.summarize(fits)
    assert summary["channels"] == b * c and summary["all_zero"] == 2 and summary["too_few"] == 2
    assert summary["fitted"] == b * (c - 2) and 0 <= summary["share_beta_below_1"] <= 1
    assert summary["beta_q25"] <= summary["beta_median"] <= summary["beta_q75"]
    # Centred values: constant channels are the degenerate ones, negative values are fine.
    centred = diagnose.fit_channels(values[:1, :8] - 5.0, mode="centered")
    assert centred.status[0, 0] == diagnose.ALL_ZERO and np.all(centred.status[0, 1:] == diagnose.FITTED)
    with pytest.raises(ValueError, match="negative values; use mode='centered'"):
        diagnose.fit_channels(values[:1, :8] - 5.0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from gg_jax.training import trainer

    workdir = tmp_path_factory.mktemp("diagnose") / "run"
    trainer.train_and_evaluate(common.tiny_config(num_train_steps=1), str(workdir))
    return workdir


def _tensorboard_tags(workdir) -> set:
    from tensorboard.backend.event_processing import event_accumulator

    tags = set()
    for path in pathlib.Path(workdir).glob("events.out.tfevents.*"):
        acc = event_accumulator.EventAccumulator(str(path), size_guidance={event_accumulator.TENSORS: 0})
        acc.Reload()
        tags |= set(acc.Tags().get("tensors", [])) | set(acc.Tags().get("scalars", []))
    return tags


def test_run_on_a_trained_model_writes_figures_summaries_and_tensorboard(trained, tmp_path):
    out = tmp_path / "diag"
    summary = diagnose.run(workdir=str(trained), out=str(out), images="digits", num_images=4)
    assert summary["model"] == "resnet18_3g" and summary["step"] == 1 and summary["image_size"] == 48
    assert set(summary["layers"]) == {"layer4", "reduced"}
    assert summary["layers"]["layer4"]["map"] == "3x3x512" and summary["layers"]["reduced"]["map"] == "3x3x16"
    for name in ("figure1_layer4.png", "figure1_reduced.png", "beta_hist.png", "summary.json", "summary.md"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "beta_hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "summary.json").read_text()) == summary
    pooled = summary["layers"]["reduced"]["pooled"]
    assert pooled["channels"] == 16 and pooled["fitted"] + pooled["all_zero"] + pooled["too_few"] == 16
    assert "| reduced |" in (out / "summary.md").read_text()
    tags = _tensorboard_tags(trained)
    assert {"diagnose/reduced/pooled/beta_median", "diagnose/layer4/per_image/zero_share"} <= tags
    assert {"diagnose/figure1_reduced", "diagnose/beta_hist"} <= tags
    with pytest.raises(ValueError, match="is not a training run"):
        diagnose.run(str(trained), workdir=str(tmp_path), out=str(tmp_path / "x"))


def test_command_line_on_image_files(trained, tmp_path):
    import matplotlib.image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for i in range(3):  # photos of other sizes: resized and centre-cropped to the run's 48 px
        matplotlib.image.imsave(folder / f"img{i}.png", rng.random((60 + 10 * i, 80, 3)))
    out = tmp_path / "cli"
    args = ["-m", "gg_jax.diagnose", f"--checkpoint={trained}/checkpoints/1", f"--images={folder}", f"--out={out}"]
    proc = common.run([*args, "--mode=centered", "--channels=0,5"], common.subprocess_env(tmp_path))
    result = common.last_json(proc.stdout)
    assert set(result) == {"layer4", "reduced"} and result["reduced"]["channels"] == 3 * 16
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_images"] == 3 and summary["mode"] == "centered"
    assert summary["layers"]["reduced"]["figure_channels"] == [0, 5]
    assert (out / "figure1_layer4.png").is_file()
    proc = common.run(
        [*args[:-2], f"--images={tmp_path}/none/*.jpg", f"--out={out}"], common.subprocess_env(tmp_path), check=False
    )
    assert proc.returncode == 1 and "no image files found" in proc.stderr
