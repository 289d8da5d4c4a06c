"""The paper's Figure 1 as a tool: how generalized Gaussian are a model's last convolutional activations?

    python -m gg_jax.diagnose --checkpoint=/tmp/gg_demo --images=digits --out=/tmp/gg_diag
    python -m gg_jax.diagnose --workdir=/tmp/gg_demo --out=/tmp/gg_diag   # + TensorBoard into the run
    python -m gg_jax.diagnose --checkpoint=ckpt/r50_imagenet --images='photos/*.jpg' --out=/tmp/r50_diag

Runs any gg_jax checkpoint (a training workdir or one of its steps, or a converted PyTorch
checkpoint; `gg_jax.checkpoints.load`) on a few images, preprocessed as the model's eval
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

import json
import os
from typing import Any

from gg_jax.diagnose import fit, plots, report
from gg_jax.diagnose.fit import (
    ALL_ZERO,
    DEFAULT_NUM_IMAGES,
    FITTED,
    LAYERS,
    MIN_SAMPLES,
    MODES,
    NUM_FIGURE_CHANNELS,
    TOO_FEW,
    ChannelFits,
    DiagnoseError,
    fit_channels,
    summarize,
)
from gg_jax.diagnose.inputs import activations, load_images

__all__ = [
    "ALL_ZERO",
    "FITTED",
    "LAYERS",
    "MODES",
    "TOO_FEW",
    "ChannelFits",
    "DiagnoseError",
    "activations",
    "fit_channels",
    "load_images",
    "run",
    "summarize",
]


def _get(config, *keys):
    for key in keys:
        if config is None:
            return None
        config = config.get(key) if hasattr(config, "get") else None
    return config


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
      checkpoint: any gg_jax checkpoint (`gg_jax.checkpoints.load`); default `workdir`.
      out: output directory (created).
      images: a dataset name of `gg_jax.data` (`digits`), a folder, a glob or comma-separated files.
      config: a training config (ConfigDict or dict) for `image_size`, `eval.resize_size` and
        `dataset.data_dir`; default: the checkpoint's run's (`gg_jax.checkpoints.run_config`).
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
    from gg_jax import checkpoints

    checkpoint = checkpoint or workdir
    if not checkpoint:
        raise DiagnoseError("Give a checkpoint (or a training workdir) to diagnose.")
    if workdir is not None and not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise DiagnoseError(
            f"--workdir={workdir} is not a training run (no checkpoints/ inside); its TensorBoard summaries are "
            "written there. Leave --workdir out to write only to --out."
        )
    if mode not in MODES:
        raise DiagnoseError(f"mode must be one of {MODES}, got {mode!r}.")
    config = config if config is not None else checkpoints.run_config(checkpoint)
    image_size = int(image_size or _get(config, "image_size") or 224)
    resize_size = _get(config, "eval", "resize_size")
    if not resize_size or resize_size < image_size:
        resize_size = round(image_size * 256 / 224)
    data_dir = data_dir or _get(config, "dataset", "data_dir")

    model, variables, meta = checkpoints.load(checkpoint)
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
    per_image_parts = fit.fit_together([m.transpose(0, 2, 1) for m in maps.values()], 1, fit_options)
    pooled_parts = fit.fit_together(
        [m.transpose(2, 0, 1).reshape(m.shape[-1], -1) for m in maps.values()], 0, fit_options
    )
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
        chosen = list(channels) if channels else plots.choose_channels(layer_image, layer_pooled, NUM_FIGURE_CHANNELS)
        bad = [ch for ch in chosen if not 0 <= ch < c]
        if bad:
            raise DiagnoseError(f"channels {bad} do not exist in {layer} ({c} channels).")
        name = f"figure1_{layer}.png"
        plots.plot_figure1(os.path.join(out, name), layer, values, layer_image, layer_pooled, chosen, mode, names[0])
        summary["layers"][layer]["figure_channels"] = chosen
        summary["files"].append(name)
    plots.plot_beta_hist(os.path.join(out, "beta_hist.png"), results)
    summary["files"] += ["beta_hist.png", "summary.json", "summary.md"]
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(report.markdown(summary))
    if workdir is not None:
        report.write_tensorboard(workdir, int(meta.get("step") or 0), summary, out)
    return summary
