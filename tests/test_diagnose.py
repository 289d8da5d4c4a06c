"""gg_jax.diagnose: per-channel generalized Gaussian fits of a model's activations (the paper's Figure 1).

End to end: a tiny model trained for one step (the training tests' tiny demo) is diagnosed
through the command line (which runs `diagnose.run`), with its summary going into the run's
TensorBoard. The fitting is checked on synthetic activations of ImageNet size (2 images x
1024 channels x 14 x 14 positions), the image loading on files.
"""

import json
import pathlib

import numpy as np
import pytest
from scipy import stats

from gg_jax import diagnose
from tests import runs

pytest.importorskip("matplotlib")


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
    # The gain is the difference of the mean log-likelihoods (SciPy's densities, x 2 on x > 0 for
    # both): the generalized Gaussian exp(-(x^2 / delta)^beta / 2) is gennorm with shape 2 beta and
    # scale (2 delta^beta)^(1 / (2 beta)); the Gaussian the zero-mean MLE, variance mean x^2.
    x = values[0, 2][values[0, 2] > 0].astype(np.float64)
    np.testing.assert_allclose(fits.variance[0, 2], np.mean(x * x), rtol=1e-5)
    beta, delta = float(fits.beta[0, 2]), float(fits.delta[0, 2])
    ggd = stats.gennorm(2 * beta, scale=(2 * delta**beta) ** (1 / (2 * beta))).logpdf(x)
    gauss = stats.norm(scale=np.sqrt(np.mean(x * x))).logpdf(x)
    np.testing.assert_allclose(fits.ll_gain[0, 2], np.mean(ggd) - np.mean(gauss), rtol=1e-3, atol=1e-5)
    summary = diagnose.summarize(fits)
    assert summary["channels"] == b * c and summary["all_zero"] == 2 and summary["too_few"] == 2
    assert summary["fitted"] == b * (c - 2) and 0 <= summary["share_beta_below_1"] <= 1
    assert summary["beta_q25"] <= summary["beta_median"] <= summary["beta_q75"]
    # Centred values: constant channels are the degenerate ones, negative values are fine.
    centred = diagnose.fit_channels(values[:1, :8] - 5.0, mode="centered")
    assert centred.status[0, 0] == diagnose.ALL_ZERO and np.all(centred.status[0, 1:] == diagnose.FITTED)
    with pytest.raises(ValueError, match="negative values; use mode='centered'"):
        diagnose.fit_channels(values[:1, :8] - 5.0)


def test_fit_channels_of_any_finite_scale_and_non_finite_activations():
    rng = np.random.default_rng(1)
    values = np.abs(stats.gennorm(0.8, scale=0.5).rvs(size=(2, 4, 196), random_state=rng)).astype(np.float32)
    fits = diagnose.fit_channels(values)
    # Exact powers of two: beta and the gain are unchanged, delta and the variance scale by 4^k
    # (up to the last bits of the compiled fit); unscaled, the sums of x^2 would leave float32's range.
    for k in (-62, 62):
        scaled = diagnose.fit_channels(values * np.float32(2.0**k))
        np.testing.assert_allclose(scaled.beta, fits.beta, rtol=1e-6)
        np.testing.assert_allclose(scaled.ll_gain, fits.ll_gain, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(scaled.delta, fits.delta * 4.0**k, rtol=1e-5)
        np.testing.assert_allclose(scaled.variance, fits.variance * 4.0**k, rtol=1e-6)
    values[1, 2, 7] = np.nan
    values[0, 3, 0] = np.inf
    with pytest.raises(ValueError, match=r"2 of 8 channels have NaN or infinite activations \(first at index \(0, 3\)"):
        diagnose.fit_channels(values)


def _tensorboard_tags(workdir) -> set:
    from tensorboard.backend.event_processing import event_accumulator

    tags = set()
    for path in pathlib.Path(workdir).glob("events.out.tfevents.*"):
        acc = event_accumulator.EventAccumulator(str(path), size_guidance={event_accumulator.TENSORS: 0})
        acc.Reload()
        tags |= {tag for kind in ("tensors", "scalars", "images") for tag in acc.Tags().get(kind, [])}
    return tags


def test_load_images_preprocesses_files_like_the_eval_pipeline(tmp_path):
    import matplotlib.image

    from gg_jax import data

    rng = np.random.default_rng(2)
    for i in range(3):  # photos of other sizes: shorter side resized to 55, centre crop 48
        matplotlib.image.imsave(tmp_path / f"img{i}.png", rng.random((60 + 10 * i, 80, 3)))
    images, names = diagnose.load_images(str(tmp_path), image_size=48, num_images=2)
    assert images.shape == (2, 48, 48, 3) and images.dtype == np.float32
    assert [pathlib.Path(n).name for n in names] == ["img0.png", "img1.png"]
    # Normalised by the data package's mean and standard deviation: pixels in [0, 1] after undoing it.
    pixels = images * np.array(data.STDDEV_RGB) + np.array(data.MEAN_RGB)
    assert -0.01 < pixels.min() and pixels.max() < 1.01 and pixels.std() > 0.1
    glob_images, _ = diagnose.load_images(f"{tmp_path}/img2.*", image_size=48)
    assert glob_images.shape == (1, 48, 48, 3)
    with pytest.raises(diagnose.DiagnoseError, match="no image files found"):
        diagnose.load_images(f"{tmp_path}/none/*.jpg", image_size=48)


def test_command_line_on_a_trained_model(tmp_path, tiny_run):
    """A tiny model trained for one step, diagnosed from the command line with --workdir."""
    workdir, _ = tiny_run
    with pytest.raises(ValueError, match="is not a training run"):
        diagnose.run(str(workdir), workdir=str(tmp_path), out=str(tmp_path / "x"))

    out = tmp_path / "diag"
    args = ["-m", "gg_jax.diagnose", f"--workdir={workdir}", "--images=digits", "--num_images=4", f"--out={out}"]
    # 3x3 maps: with --min_samples=10 no single image has enough values, only the pooled fits run.
    proc = runs.run([*args, "--channels=0,5", "--min_samples=10"], runs.subprocess_env(tmp_path))
    summary = json.loads((out / "summary.json").read_text())
    assert runs.last_json(proc.stdout) == {layer: entry["per_image"] for layer, entry in summary["layers"].items()}
    assert summary["model"] == "resnet18_3g" and summary["step"] == 1 and summary["image_size"] == 48
    assert summary["num_images"] == 4 and summary["mode"] == "positive"
    assert summary["layers"]["layer4"]["map"] == "3x3x512" and summary["layers"]["reduced"]["map"] == "3x3x16"
    assert summary["layers"]["reduced"]["figure_channels"] == [0, 5]
    for name in ("figure1_layer4.png", "figure1_reduced.png", "beta_hist.png", "summary.json", "summary.md"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "beta_hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pooled = summary["layers"]["reduced"]["pooled"]
    assert pooled["channels"] == 16 and pooled["fitted"] > 0
    assert pooled["fitted"] + pooled["all_zero"] + pooled["too_few"] == 16
    assert 0 < pooled["beta_q25"] <= pooled["beta_median"] <= pooled["beta_q75"] and pooled["ll_gain_mean"] >= 0
    per_image = summary["layers"]["layer4"]["per_image"]
    assert per_image["fitted"] == 0 and per_image["beta_median"] is None
    assert per_image["all_zero"] + per_image["too_few"] == per_image["channels"] == 4 * 512
    assert "| reduced |" in (out / "summary.md").read_text() and "summary.md" in proc.stdout
    # The summary in the run's TensorBoard, next to its training curves.
    tags = _tensorboard_tags(workdir)
    assert {"train/loss", "diagnose/reduced/pooled/beta_median", "diagnose/layer4/per_image/zero_share"} <= tags
    assert {"diagnose/figure1_reduced", "diagnose/beta_hist"} <= tags
