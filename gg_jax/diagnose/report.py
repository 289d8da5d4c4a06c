"""The summary as Markdown and as TensorBoard scalars and images of a training run."""

from __future__ import annotations

import os

import numpy as np


def markdown(summary: dict) -> str:
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


def write_tensorboard(workdir: str, step: int, summary: dict, out: str):
    from gg_jax import summary as summary_lib

    writer = summary_lib.create_writer(workdir)
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
