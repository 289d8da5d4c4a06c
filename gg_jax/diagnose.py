"""The paper's Figure 1 as a tool: how generalized Gaussian are a model's last convolutional activations?

    python -m gg_jax.diagnose --checkpoint=/tmp/gg_demo --images=digits --out=/tmp/gg_diag
    python -m gg_jax.diagnose --workdir=/tmp/gg_demo --out=/tmp/gg_diag   # + TensorBoard into the run
    python -m gg_jax.diagnose --checkpoint=ckpt/r50_imagenet --images='photos/*.jpg' --out=/tmp/r50_diag

Runs any gg_jax checkpoint (a training workdir or one of its steps, or a converted PyTorch
checkpoint; `variables_io.load_model`) on a few images, preprocessed as the model's eval
pipeline does, and takes the last convolutional activations: the backbone's output
(`layer4`) and, for the covariance heads, the head's reduced map (`reduced`, the output of
its 1x1 conv -> BN -> ReLU, what the 3G layer models). For every image and channel it fits a
univariate generalized Gaussian (`gg_jax.mggd.fit` with d = 1) and a Gaussian over the
spatial positions, and the same per channel over the positions of all images ("pooled").

What is fitted (`mode`):
  "positive" (default): the zero-mean distributions of the paper's Eqn. (1) fitted to the
    non-zero activations. After a ReLU a share of the values is exactly 0; a zero-mean
    generalized Gaussian cannot carry that point mass (its likelihood grows without bound as
    beta -> 0), so the zeros are left out and reported as `zero_share`. On x > 0 the fitted
    densities are the folded ones, 2 p(x).
  "centered": every value minus the channel's mean over the positions, zeros included (the
    centring of the 3G head's covariance).
Channels with no value to fit (all zero after the ReLU, or constant) are skipped and counted
(`all_zero`), channels with fewer than `min_samples` values too (`too_few`).

Writes to `--out`: `figure1_<layer>.png` (Figure 1 style: histograms of chosen channels with
both fitted densities, for the first image and pooled over the images), `beta_hist.png` (the
fitted betas of all channels), `summary.json` and `summary.md` (median and quartiles of beta,
share of beta < 1, mean log-likelihood gain of the generalized Gaussian over the Gaussian in
nats per value); with `--workdir` (a training run) the same as TensorBoard scalars and images
`diagnose/...` at the checkpoint's step. Plots need matplotlib (`pip install matplotlib`, the
`diagnose` extra). Details: docs/diagnose.md.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import math
import os
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gg_jax import mggd

LAYERS = ("layer4", "reduced")
MODES = ("positive", "centered")
#: Fewer values than this in a channel (after leaving out zeros in "positive" mode): not fitted.
MIN_SAMPLES = 8
DEFAULT_NUM_IMAGES = 16
NUM_FIGURE_CHANNELS = 4
# Status of one fit.
FITTED, ALL_ZERO, TOO_FEW = 0, 1, 2
# Values per compiled fit (rows x values per row; the rows are padded to a power of two, 64 to 8192).
_CHUNK_VALUES = 1 << 22


class ChannelFits(NamedTuple):
    """Per-channel fits, arrays of the leading shape of the values (e.g. `[images, channels]`).

    status: FITTED, ALL_ZERO (nothing to fit: all zero, or constant) or TOO_FEW.
    num_values: values fitted (non-zero ones in "positive" mode).
    zero_share: share of exact zeros among all values of the channel.
    beta, delta: the generalized Gaussian (NaN where not fitted).
    variance: the zero-mean Gaussian's variance (the GGD with beta = 1).
    ll_gain: mean log-likelihood per value, generalized Gaussian minus Gaussian (nats, >= 0).
    converged: the fit met its tolerance with beta inside `mggd.BETA_BOUNDS`.
    """

    status: np.ndarray
    num_values: np.ndarray
    zero_share: np.ndarray
    beta: np.ndarray
    delta: np.ndarray
    variance: np.ndarray
    ll_gain: np.ndarray
    converged: np.ndarray


@functools.partial(jax.jit, static_argnames="max_iters")
def _fit_and_score(x, mask, max_iters: int):
    """GGD and Gaussian fits of `x` `[P, N]` (values where `mask`) and their mean log-likelihoods."""
    params, info = mggd.fit_with_info(x[..., None], mask=mask, max_iters=max_iters)
    maskf = mask.astype(x.dtype)
    num = jnp.maximum(jnp.sum(maskf, axis=-1), 1.0)
    log_p = jnp.where(mask, mggd.log_prob(x[..., None], params), 0.0)
    ll_ggd = jnp.sum(log_p, axis=-1) / num
    # The zero-mean Gaussian MLE (the beta = 1 fit): variance = mean x^2, mean log-likelihood
    # -log(2 pi variance)/2 - 1/2.
    variance = jnp.sum(maskf * x * x, axis=-1) / num
    ll_gauss = -0.5 * jnp.log(2.0 * math.pi * variance) - 0.5
    return params.beta, params.delta, variance, ll_ggd - ll_gauss, info.converged


def fit_channels(values, *, mode: str = "positive", min_samples: int = MIN_SAMPLES, max_iters: int = 50):
    """Univariate generalized Gaussian and Gaussian fits of each row of `values`.

    Args:
      values: `[..., N]` activations, e.g. `[images, channels, positions]`; one fit per row.
      mode: "positive" (zero-mean fits of the non-zero values; ReLU outputs, no negative values)
        or "centered" (zero-mean fits of the values minus the row's mean).
      min_samples: rows with fewer values to fit are marked TOO_FEW (at least 2).
      max_iters: cap of `mggd.fit`'s iterations.

    Returns:
      `ChannelFits` with arrays of shape `values.shape[:-1]`.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    if min_samples < 2:
        raise ValueError(
            f"min_samples must be at least 2 (a fit needs more values than dimensions), got {min_samples}."
        )
    values = np.asarray(values, np.float32)
    if values.ndim < 1 or values.shape[-1] < 2:
        raise ValueError(f"fit_channels expects values of shape [..., N] with N >= 2, got {values.shape}.")
    lead, n = values.shape[:-1], values.shape[-1]
    x = values.reshape(-1, n)
    zero_share = np.mean(x == 0, axis=-1)
    if mode == "positive":
        if np.any(x < 0):
            raise ValueError(
                "mode='positive' fits the non-zero values of ReLU outputs, but these activations have negative "
                "values; use mode='centered'."
            )
        mask = x > 0
        nothing = ~mask.any(axis=-1)
    else:
        nothing = np.ptp(x, axis=-1) == 0
        x = x - x.mean(axis=-1, keepdims=True)
        mask = np.ones_like(x, bool)
    num_values = mask.sum(axis=-1)
    status = np.where(nothing, ALL_ZERO, np.where(num_values < min_samples, TOO_FEW, FITTED)).astype(np.int8)
    out = {k: np.full(x.shape[0], np.nan, np.float32) for k in ("beta", "delta", "variance", "ll_gain")}
    converged = np.zeros(x.shape[0], bool)
    todo = np.flatnonzero(status == FITTED)
    # Rows per compiled fit: a power of two (few distinct programs), <= _CHUNK_VALUES values in all.
    chunk = 1 << int(np.clip(math.log2(_CHUNK_VALUES / n), 6, 13))
    for start in range(0, len(todo), chunk):
        rows = todo[start : start + chunk]
        size = min(chunk, max(64, 1 << (len(rows) - 1).bit_length()))
        xs = np.zeros((size, n), np.float32)
        ms = np.zeros((size, n), bool)
        xs[: len(rows)], ms[: len(rows)] = x[rows], mask[rows]
        beta, delta, variance, gain, conv = jax.device_get(_fit_and_score(xs, ms, max_iters=max_iters))
        for key, value in zip(("beta", "delta", "variance", "ll_gain"), (beta, delta, variance, gain)):
            out[key][rows] = value[: len(rows)]
        converged[rows] = conv[: len(rows)]
    reshape = lambda a: a.reshape(lead)
    return ChannelFits(
        status=reshape(status),
        num_values=reshape(num_values),
        zero_share=reshape(zero_share.astype(np.float32)),
        beta=reshape(out["beta"]),
        delta=reshape(out["delta"]),
        variance=reshape(out["variance"]),
        ll_gain=reshape(out["ll_gain"]),
        converged=reshape(converged),
    )


def _fit_together(arrays, axis: int, options) -> list[ChannelFits]:
    """`fit_channels` of each array, as one batch when their numbers of values agree (one compilation)."""
    if len({a.shape[-1] for a in arrays}) > 1:
        return [fit_channels(a, **options) for a in arrays]
    fits = fit_channels(np.concatenate(arrays, axis), **options)
    sizes = np.cumsum([a.shape[axis] for a in arrays])[:-1]
    return [ChannelFits(*parts) for parts in zip(*(np.split(field, sizes, axis) for field in fits))]


def _number(x):
    x = float(x)
    return None if math.isnan(x) else x


def summarize(fits: ChannelFits) -> dict[str, Any]:
    """Summary statistics of `fits` over all its fitted channels (JSON-serialisable; None = no fit)."""
    ok = fits.status == FITTED
    beta = fits.beta[ok]
    lo, hi = mggd.BETA_BOUNDS
    quantiles = np.quantile(beta, [0.25, 0.5, 0.75]) if beta.size else [np.nan] * 3
    return {
        "channels": int(fits.status.size),
        "fitted": int(ok.sum()),
        "all_zero": int((fits.status == ALL_ZERO).sum()),
        "too_few": int((fits.status == TOO_FEW).sum()),
        "not_converged": int((ok & ~fits.converged).sum()),
        "beta_at_bound": int(((beta <= lo * 1.0001) | (beta >= hi * 0.9999)).sum()),
        "values_per_fit_median": _number(np.median(fits.num_values[ok]) if ok.any() else np.nan),
        "beta_q25": _number(quantiles[0]),
        "beta_median": _number(quantiles[1]),
        "beta_q75": _number(quantiles[2]),
        "share_beta_below_1": _number(np.mean(beta < 1) if beta.size else np.nan),
        "ll_gain_mean": _number(np.mean(fits.ll_gain[ok]) if ok.any() else np.nan),
        "ll_gain_median": _number(np.median(fits.ll_gain[ok]) if ok.any() else np.nan),
        "zero_share": _number(np.mean(fits.zero_share)),
    }


# ------------------------------------------------------------------------------------ inputs


def _load_config(config):
    """A config file path (`configs/demo.py`) or a ConfigDict / dict -> the config, or None."""
    if config is None or not isinstance(config, str):
        return config
    import importlib.util

    if not os.path.isfile(config):
        raise FileNotFoundError(f"--config={config}: no such config file.")
    spec = importlib.util.spec_from_file_location("_gg_jax_diagnose_config", config)
    module = importlib.util.module_from_spec(spec)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(config)))
    sys.path.insert(0, repo)  # configs import each other as `configs.default`
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(repo)
    return module.get_config()


def _run_config(checkpoint: str) -> dict | None:
    """The `config.json` of the training run that `checkpoint` belongs to, if any."""
    path = os.path.abspath(checkpoint)
    for _ in range(3):  # WORKDIR, WORKDIR/checkpoints, WORKDIR/checkpoints/<step>
        candidate = os.path.join(path, "config.json")
        if os.path.isfile(candidate):
            with open(candidate) as f:
                return json.load(f)
        path = os.path.dirname(path)
    return None


def _get(config, *keys):
    for key in keys:
        if config is None:
            return None
        config = config.get(key) if hasattr(config, "get") else getattr(config, key, None)
    return config


def _image_files(images: str) -> list[str]:
    from gg_jax.data.datasets import IMAGE_EXTENSIONS

    if os.path.isdir(images):
        files = [
            os.path.join(root, f)
            for root, _, names in os.walk(images)
            for f in names
            if f.lower().endswith(IMAGE_EXTENSIONS)
        ]
    else:
        files = [f for pattern in images.split(",") for f in glob.glob(os.path.expanduser(pattern))]
    return sorted(files)


def load_images(
    images: str,
    *,
    image_size: int,
    resize_size: int | None = None,
    num_images: int = DEFAULT_NUM_IMAGES,
    data_dir: str | None = None,
):
    """Up to `num_images` images, preprocessed as the eval pipeline does: `([B, S, S, 3] float32, names)`.

    `images`: a folder (searched recursively), a glob or comma-separated files (JPEG, PNG, BMP,
    GIF; the shorter side resized to `resize_size`, centre crop `image_size`, as ImageNet
    evaluation), or a dataset name of `gg_jax.data` (e.g. `digits`, `imagenet2012` with
    `data_dir`): the first images of its eval split, through `gg_jax.data.eval_batches`.
    Normalised by `gg_jax.data.MEAN_RGB` / `STDDEV_RGB`.
    """
    from gg_jax import data
    from gg_jax.data import preprocessing as pp

    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}.")
    resize_size = resize_size or round(image_size * 256 / 224)
    from gg_jax.data.datasets import IMAGE_EXTENSIONS

    looks_like_path = (
        os.path.exists(images) or any(ch in images for ch in "/\\*?[,") or images.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not looks_like_path:
        batches = data.eval_batches(
            images,
            data_dir=data_dir,
            global_batch_size=num_images,
            process_index=0,
            process_count=1,
            image_size=image_size,
            resize_size=resize_size,
        )
        batch = next(iter(batches))
        keep = np.asarray(batch["mask"], bool)
        return np.asarray(batch["image"], np.float32)[keep], [f"{images}[{i}]" for i in range(int(keep.sum()))]
    files = _image_files(images)[:num_images]
    if not files:
        raise FileNotFoundError(
            f"--images={images}: no image files found (a folder, a glob such as 'photos/*.jpg', comma-separated "
            "files, or a dataset name such as 'digits')."
        )
    from gg_jax.data._tf import tf as _tf

    tf = _tf()
    out = []
    for f in files:
        image = pp.eval_preprocess(tf.io.read_file(f), image_size=image_size, resize_size=resize_size)
        out.append(np.asarray(pp.normalize(image[None]))[0])
    return np.stack(out).astype(np.float32), files


def activations(model, variables, images, *, batch_size: int = 8) -> dict[str, np.ndarray]:
    """`{'layer4': [B, H, W, C], 'reduced': [B, H, W, C']}` of `model` on `images` (eval mode).

    `reduced` (the head's 1x1 reduction) is present for heads with a reduction only. Images are
    run `batch_size` at a time (the last batch padded), so memory stays that of one batch.
    """

    def features(v, x):
        _, state = model.apply(v, x, train=False, mutable=["intermediates"])
        it = state["intermediates"]
        out = {"layer4": it["layer4"][0]}
        if "reduced" in it.get("head", {}):
            out["reduced"] = it["head"]["reduced"][0]
        return out

    fn = jax.jit(features)
    images = np.asarray(images, np.float32)
    parts = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk),) + chunk.shape[1:], chunk.dtype)])
        feats = jax.device_get(fn(variables, padded))
        parts.append({k: np.asarray(v[: len(chunk)], np.float32) for k, v in feats.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# ----------------------------------------------------------------------------------- figures


def _figure(width, height):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "gg_jax.diagnose draws its figures with matplotlib: pip install matplotlib (or the 'diagnose' extra)."
        ) from e
    fig = Figure(figsize=(width, height), dpi=80)
    FigureCanvasAgg(fig)
    return fig


def _density(grid, beta, delta, variance, folded: bool):
    """Fitted GGD and Gaussian densities on `grid` (x2 on x > 0 for the folded fits)."""
    params = mggd.MGGD(np.ones((1, 1), np.float32), np.float32(beta), np.float32(delta))
    ggd = np.exp(np.asarray(mggd.log_prob(grid[:, None], params), np.float64))
    gauss = np.exp(-0.5 * grid**2 / variance) / math.sqrt(2 * math.pi * variance)
    factor = 2.0 if folded else 1.0
    return factor * ggd, factor * gauss


def _panel(ax, values, fit: dict, folded: bool, title: str):
    ax.set_title(title, fontsize=9)
    if not values.size:
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
        return
    bins = int(np.clip(np.sqrt(values.size) * 1.5, 5, 40))
    ax.hist(values, bins=bins, density=True, color="0.25", alpha=0.6, label="activations")
    if fit["status"] == FITTED:
        lo = 0.0 if folded else float(values.min())
        grid = np.linspace(lo, float(values.max()), 200)
        if folded:
            grid = grid[1:]
        ggd, gauss = _density(grid, fit["beta"], fit["delta"], fit["variance"], folded)
        ax.plot(grid, ggd, color="tab:red", lw=1.6, label=f"gen. Gaussian, beta={fit['beta']:.2f}")
        ax.plot(grid, gauss, color="tab:blue", lw=1.2, ls="--", label="Gaussian")
        ax.legend(fontsize=7, loc="upper right")
    else:
        ax.text(0.5, 0.8, "not fitted", ha="center", transform=ax.transAxes, fontsize=8)
    ax.tick_params(labelsize=7)


def _choose_channels(per_image: ChannelFits, pooled: ChannelFits, count: int) -> list[int]:
    """Fitted channels (in the first image and pooled): most values in the first image, then largest."""
    ok = (per_image.status[0] == FITTED) & (pooled.status == FITTED)
    candidates = np.flatnonzero(ok) if ok.any() else np.flatnonzero(pooled.status == FITTED)
    if not candidates.size:
        candidates = np.arange(pooled.status.size)
    strength = np.nan_to_num(pooled.variance, nan=0.0)
    order = sorted(candidates, key=lambda c: (-int(per_image.num_values[0, c]), -float(strength[c]), int(c)))
    return sorted(int(c) for c in order[:count])


def _fit_dict(fits: ChannelFits, index) -> dict:
    return {k: (v[index].item() if hasattr(v[index], "item") else v[index]) for k, v in fits._asdict().items()}


def plot_figure1(
    path, layer: str, values, per_image: ChannelFits, pooled: ChannelFits, channels, mode: str, image_name
):
    """Figure 1 style: for each channel, the histogram and both fitted densities (first image; pooled)."""
    folded = mode == "positive"
    fig = _figure(3.0 * len(channels), 5.2)
    axes = fig.subplots(2, len(channels), squeeze=False)

    def shown(v):
        v = np.asarray(v, np.float64)
        return v[v > 0] if folded else v - v.mean()

    for j, c in enumerate(channels):
        first = shown(values[0, :, c])
        _panel(axes[0, j], first, _fit_dict(per_image, (0, c)), folded, f"{layer} ch {c}: image 0, {first.size} values")
        _panel(
            axes[1, j], shown(values[:, :, c].reshape(-1)), _fit_dict(pooled, c), folded, f"{layer} ch {c}: all images"
        )
    what = "non-zero activations (folded fits)" if folded else "centred activations"
    fig.suptitle(f"{layer}: {what}; first image: {os.path.basename(str(image_name))}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def plot_beta_hist(path, results: dict[str, tuple[ChannelFits, ChannelFits]]):
    """Histograms of the fitted betas (log scale), per image and channel, and pooled per channel."""
    lo, hi = mggd.BETA_BOUNDS
    bins = np.linspace(math.log2(lo), math.log2(hi), 65)
    fig = _figure(4.2 * len(results), 3.4)
    axes = fig.subplots(1, len(results), squeeze=False)[0]
    for ax, (layer, (per_image, pooled)) in zip(axes, results.items()):
        for fits, label, style in (
            (per_image, "per image and channel", dict(color="0.35", alpha=0.6)),
            (pooled, "per channel, all images", dict(histtype="step", color="tab:red", lw=1.5)),
        ):
            beta = fits.beta[fits.status == FITTED]
            if beta.size:
                weights = np.full(beta.size, 1.0 / beta.size)
                ax.hist(np.log2(beta), bins=bins, weights=weights, label=f"{label} ({beta.size})", **style)
        ax.axvline(0.0, color="k", lw=0.8, ls=":")
        ticks = np.arange(math.ceil(math.log2(lo)), math.floor(math.log2(hi)) + 1, 2)
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{2.0**t:g}" if t >= 0 else f"1/{2.0**-t:g}" for t in ticks], fontsize=6)
        ax.set_xlabel("beta (1 = Gaussian; log scale)", fontsize=8)
        ax.set_ylabel("share of fits", fontsize=8)
        title = [layer]
        for scope, fits in (("per image", per_image), ("pooled", pooled)):
            s = summarize(fits)
            if s["beta_median"] is not None:
                title.append(f"{scope}: median {s['beta_median']:.2f}, < 1: {s['share_beta_below_1']:.0%}")
        ax.set_title("\n".join(title), fontsize=8)
        ax.legend(fontsize=7)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path)


# ----------------------------------------------------------------------------------- reports


def _markdown(summary: dict) -> str:
    def fmt(x, pattern="{:.3f}"):
        return "-" if x is None else pattern.format(x)

    lines = [
        "# Are the activations generalized Gaussian?",
        "",
        f"Checkpoint `{summary['checkpoint']}` ({summary['model']}, step {summary.get('step', '-')}), "
        f"{summary['num_images']} images from `{summary['images']}` at {summary['image_size']} px; "
        f"fits: {summary['mode']} ({'non-zero activations' if summary['mode'] == 'positive' else 'centred'}).",
        "",
        "| layer | fits | map | values per fit | skipped: all zero / too few | not converged | beta q25 / median / q75 "
        "| beta < 1 | LL gain (nats/value) | zeros |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for layer, entry in summary["layers"].items():
        for scope in ("per_image", "pooled"):
            s = entry[scope]
            what = "image x channel" if scope == "per_image" else "channel, all images"
            beta = " / ".join(fmt(s[k], "{:.2f}") for k in ("beta_q25", "beta_median", "beta_q75"))
            cells = [
                layer,
                f"{s['fitted']} / {s['channels']} ({what})",
                entry["map"],
                fmt(s["values_per_fit_median"], "{:.0f}"),
                f"{s['all_zero']} / {s['too_few']}",
                str(s["not_converged"]),
                beta,
                fmt(s["share_beta_below_1"], "{:.0%}"),
                fmt(s["ll_gain_mean"]),
                fmt(s["zero_share"], "{:.0%}"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "beta: shape of the generalized Gaussian (1 = Gaussian, < 1 heavier tails). LL gain: mean log-likelihood",
        "per value of the generalized Gaussian minus the Gaussian. Not converged: beta at a bound of its search",
        "range or the tolerance not met (most often a few values whose likelihood grows towards beta = infinity).",
        "",
    ]
    lines += [f"![{name}]({name})" for name in summary["files"] if name.endswith(".png")]
    return "\n".join(lines) + "\n"


def _write_tensorboard(workdir: str, step: int, summary: dict, out: str):
    from clu import metric_writers

    writer = metric_writers.create_default_writer(workdir, asynchronous=False)
    scalars = {}
    for layer, entry in summary["layers"].items():
        for scope in ("per_image", "pooled"):
            for key in ("beta_median", "beta_q25", "beta_q75", "share_beta_below_1", "ll_gain_mean", "zero_share"):
                value = entry[scope][key]
                if value is not None:
                    scalars[f"diagnose/{layer}/{scope}/{key}"] = value
    writer.write_scalars(step, scalars)
    images = {}
    for name in summary["files"]:
        if name.endswith(".png"):
            images[f"diagnose/{name[:-4]}"] = _read_png(os.path.join(out, name))[None]
    writer.write_images(step, images)
    writer.flush()
    writer.close()


def _read_png(path) -> np.ndarray:
    import matplotlib.image

    image = matplotlib.image.imread(path)
    return np.round(np.asarray(image)[..., :3] * 255).astype(np.uint8)


# --------------------------------------------------------------------------------------- run


def run(
    checkpoint: str | None = None,
    *,
    out: str,
    images: str = "digits",
    config=None,
    workdir: str | None = None,
    image_size: int | None = None,
    num_images: int = DEFAULT_NUM_IMAGES,
    channels=None,
    mode: str = "positive",
    min_samples: int = MIN_SAMPLES,
    batch_size: int = 8,
    data_dir: str | None = None,
) -> dict[str, Any]:
    """Everything `python -m gg_jax.diagnose` does; returns the summary (also written to `out`).

    Args:
      checkpoint: any gg_jax checkpoint (`variables_io.load_model`); default `workdir`.
      out: output directory (created).
      images: a dataset name of `gg_jax.data` (`digits`), a folder, a glob or comma-separated files.
      config: a config file (`configs/demo.py`) or ConfigDict, for `image_size`, `eval.resize_size`
        and `dataset.data_dir`; else the training run's `config.json` when there is one.
      workdir: a training workdir: the summary also goes to its TensorBoard summaries.
      image_size: input size (default: the config's, else 224).
      num_images: how many images (the first of the dataset's eval split, or of the files).
      channels: channels to plot (default: the fitted channels with most values in image 0).
      mode: "positive" or "centered" (see the module docstring).
      min_samples: fewer values than this: the channel is skipped (`too_few`).
      batch_size: images per forward pass.
      data_dir: TFDS data directory for a dataset name (default: the config's).

    Returns:
      The summary dict (also `out/summary.json`).
    """
    from gg_jax import variables_io

    checkpoint = checkpoint or workdir
    if not checkpoint:
        raise ValueError("Give a checkpoint (or a training workdir) to diagnose.")
    if workdir is not None and not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise ValueError(
            f"--workdir={workdir} is not a training run (no checkpoints/ inside); its TensorBoard summaries are "
            "written there. Leave --workdir out to write only to --out."
        )
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    config = _load_config(config)
    run_config = _run_config(checkpoint)
    image_size = int(image_size or _get(config, "image_size") or _get(run_config, "image_size") or 224)
    resize_size = _get(config, "eval", "resize_size") or _get(run_config, "eval", "resize_size")
    if not resize_size or resize_size < image_size:
        resize_size = round(image_size * 256 / 224)
    data_dir = data_dir or _get(config, "dataset", "data_dir") or _get(run_config, "dataset", "data_dir")

    model, variables, meta = variables_io.load_model(checkpoint, image_size=image_size)
    pixels, names = load_images(
        images, image_size=image_size, resize_size=resize_size, num_images=num_images, data_dir=data_dir
    )
    feats = activations(model, variables, pixels, batch_size=min(batch_size, len(pixels)))
    os.makedirs(out, exist_ok=True)
    fit_options = dict(mode=mode, min_samples=min_samples)
    summary: dict[str, Any] = {
        "checkpoint": os.path.abspath(checkpoint),
        "model": meta.get("model"),
        "step": meta.get("step"),
        "images": images,
        "num_images": len(pixels),
        "image_size": image_size,
        "mode": mode,
        "min_samples": min_samples,
        "layers": {},
        "files": [],
    }
    layers = [layer for layer in LAYERS if layer in feats]
    maps = {layer: feats[layer].reshape(feats[layer].shape[0], -1, feats[layer].shape[-1]) for layer in layers}
    per_image_parts = _fit_together([m.transpose(0, 2, 1) for m in maps.values()], 1, fit_options)
    pooled_parts = _fit_together([m.transpose(2, 0, 1).reshape(m.shape[-1], -1) for m in maps.values()], 0, fit_options)
    results = {}
    for layer, layer_image, layer_pooled in zip(layers, per_image_parts, pooled_parts):
        values = maps[layer]  # [B, N, C]
        h, w, c = feats[layer].shape[1:]
        results[layer] = (layer_image, layer_pooled)
        summary["layers"][layer] = {
            "map": f"{h}x{w}x{c}",
            "per_image": summarize(layer_image),
            "pooled": summarize(layer_pooled),
        }
        chosen = list(channels) if channels else _choose_channels(layer_image, layer_pooled, NUM_FIGURE_CHANNELS)
        bad = [ch for ch in chosen if not 0 <= ch < c]
        if bad:
            raise ValueError(f"channels {bad} do not exist in {layer} ({c} channels).")
        name = f"figure1_{layer}.png"
        plot_figure1(os.path.join(out, name), layer, values, layer_image, layer_pooled, chosen, mode, names[0])
        summary["layers"][layer]["figure_channels"] = chosen
        summary["files"].append(name)
    plot_beta_hist(os.path.join(out, "beta_hist.png"), results)
    summary["files"] += ["beta_hist.png", "summary.json", "summary.md"]
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(_markdown(summary))
    if workdir is not None:
        _write_tensorboard(workdir, int(meta.get("step") or 0), summary, out)
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m gg_jax.diagnose",
        description="Fit generalized Gaussians and Gaussians to a model's last convolutional activations "
        "(the paper's Figure 1).",
    )
    parser.add_argument("--checkpoint", help="Any gg_jax checkpoint: a training workdir or step, or a converted one.")
    parser.add_argument("--workdir", help="A training workdir: its latest checkpoint, and TensorBoard summaries there.")
    parser.add_argument("--config", help="Config file (e.g. configs/demo.py) for the image size; default: the run's.")
    parser.add_argument("--images", default="digits", help="Dataset name (digits), image folder, glob or files.")
    parser.add_argument("--out", required=True, help="Output directory for the figures and summaries.")
    parser.add_argument("--image_size", type=int, help="Input size (default: the config's, else 224).")
    parser.add_argument("--num_images", type=int, default=DEFAULT_NUM_IMAGES)
    parser.add_argument("--channels", help="Comma-separated channels to plot (default: the most active).")
    parser.add_argument("--mode", choices=MODES, default="positive", help="Fit the non-zero or the centred values.")
    parser.add_argument("--min_samples", type=int, default=MIN_SAMPLES)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--data_dir", help="TFDS data directory for a dataset name.")
    args = parser.parse_args(argv)
    if not (args.checkpoint or args.workdir):
        parser.error("give --checkpoint=DIR or --workdir=DIR")
    channels = [int(c) for c in args.channels.split(",")] if args.channels else None
    try:
        summary = run(
            args.checkpoint,
            out=args.out,
            images=args.images,
            config=args.config,
            workdir=args.workdir,
            image_size=args.image_size,
            num_images=args.num_images,
            channels=channels,
            mode=args.mode,
            min_samples=args.min_samples,
            batch_size=args.batch_size,
            data_dir=args.data_dir,
        )
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    with open(os.path.join(args.out, "summary.md")) as f:
        print(f.read())
    print(f"Wrote {', '.join(summary['files'])} to {args.out}.")
    print(json.dumps({layer: entry["per_image"] for layer, entry in summary["layers"].items()}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
