"""`python -m gg_jax.diagnose`: see `gg_jax.diagnose`."""

from __future__ import annotations

import json
import os

from gg_jax import cli
from gg_jax.diagnose import DEFAULT_NUM_IMAGES, MIN_SAMPLES, MODES, run


def main(argv=None):
    parser = cli.ArgumentParser(
        prog="python -m gg_jax.diagnose",
        description="Fit generalized Gaussians and Gaussians to a model's last convolutional activations "
        "(the paper's Figure 1).",
    )
    parser.add_argument("--checkpoint", help="Any gg_jax checkpoint: a training workdir or step, or a converted one.")
    parser.add_argument("--workdir", help="A training workdir: its latest checkpoint, and TensorBoard summaries there.")
    parser.add_argument("--images", default="digits", help="Dataset name (digits), image folder, glob or files.")
    parser.add_argument("--out", required=True, help="Output directory for the figures and summaries.")
    parser.add_argument("--image_size", type=int, help="Input size (default: the training run's, else 224).")
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
    summary = run(
        args.checkpoint,
        out=args.out,
        images=args.images,
        workdir=args.workdir,
        image_size=args.image_size,
        num_images=args.num_images,
        channels=channels,
        mode=args.mode,
        min_samples=args.min_samples,
        batch_size=args.batch_size,
        data_dir=args.data_dir,
    )
    with open(os.path.join(args.out, "summary.md")) as f:
        print(f.read())
    print(f"Wrote {', '.join(summary['files'])} to {args.out}.")
    print(json.dumps({layer: entry["per_image"] for layer, entry in summary["layers"].items()}, sort_keys=True))
    return 0


if __name__ == "__main__":
    cli.run_tool(main)
