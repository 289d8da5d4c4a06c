"""The figures: Figure 1 style histograms with both fitted densities, and the histogram of the betas."""

from __future__ import annotations

import math
import os

import numpy as np

from gg_jax import mggd
from gg_jax.diagnose.fit import FITTED, ChannelFits, summarize
from gg_jax.errors import MissingDependencyError


def _figure(width, height):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise MissingDependencyError(
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


def choose_channels(per_image: ChannelFits, pooled: ChannelFits, count: int) -> list[int]:
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
