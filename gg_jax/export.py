"""Exported inference: a trained classifier as one serialized `jax.export` artifact.

    python -m gg_jax.export --checkpoint=WORKDIR --out=model.jax [--platforms=cpu,cuda,tpu] [--input=pixels]

writes `model.jax`, the eval-mode model (BatchNorm on its running averages) with its
weights, serialized by `jax.export`, and `model.jax.json`, a sidecar that says how to
call it. The artifact is called with nothing but jax installed (no gg_jax, no Flax):

    import jax, numpy as np
    with open("model.jax", "rb") as f:
        exported = jax.export.deserialize(f.read())
    logits = exported.call(images)   # images float32 [B, S, S, 3] -> logits float32 [B, classes]

The batch dimension is symbolic (any B >= 1); the image size S is fixed (the training
run's `image_size`, or `--image_size`). Input conventions (`--input`):
  pixels      RGB values in [0, 255] (float32; cast uint8 images), NHWC, already resized
              and cropped to S x S; the artifact normalises them with the training
              pipeline's mean and standard deviation (the default);
  normalized  images exactly as the eval step gets them: (pixels / 255 - mean) / std.
`--platforms` lists where the artifact may run (`cpu`, `cuda`, `rocm`, `tpu`); every one
is lowered here, on any machine, and the caller's default device picks one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gg_jax import cli
from gg_jax.errors import MissingDependencyError, UserError

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
INPUTS = ("pixels", "normalized")
SIDECAR_SUFFIX = ".json"
DEFAULT_IMAGE_SIZE = 224


class ExportPathError(UserError, OSError):
    """`--out` cannot be written (a directory, an existing file, no permission); nothing was written."""


def sidecar_path(out: str) -> str:
    """The sidecar JSON written beside the artifact `out`: `out + '.json'`."""
    return os.fspath(out) + SIDECAR_SUFFIX


def check_platforms(platforms: str | Sequence[str]) -> tuple[str, ...]:
    """`"cpu,cuda"` or `["cpu", "cuda"]` -> `("cpu", "cuda")`; ValueError naming the valid ones."""
    names = [p.strip().lower() for p in (platforms.split(",") if isinstance(platforms, str) else platforms)]
    names = [p for p in names if p]
    hint = {"gpu": " (for NVIDIA GPUs 'cuda', for AMD GPUs 'rocm')"}
    for name in names:
        if name not in PLATFORMS:
            raise ValueError(
                f"Unknown platform {name!r}{hint.get(name, '')}. Choose from {', '.join(PLATFORMS)}, "
                "comma-separated, e.g. --platforms=cpu,cuda,tpu."
            )
    if not names:
        raise ValueError(f"No platform given; choose from {', '.join(PLATFORMS)}, e.g. --platforms=cpu.")
    return tuple(dict.fromkeys(names))


def _check_input(input_format: str) -> str:
    if input_format not in INPUTS:
        raise ValueError(f"Unknown input convention {input_format!r}; choose 'pixels' or 'normalized'.")
    return input_format


def normalization_constants() -> tuple[np.ndarray, np.ndarray]:
    """`(255 * mean, 1 / (255 * std))` per RGB channel, float32: the training pipeline's normalisation."""
    from gg_jax.data.preprocessing import MEAN_RGB, STDDEV_RGB

    # Rounded to float32 from the same float64 values as the pipeline's constants.
    mean = np.asarray([255.0 * m for m in MEAN_RGB], np.float32)
    inv_std = np.asarray([1.0 / (255.0 * s) for s in STDDEV_RGB], np.float32)
    return mean, inv_std


def inference_function(model, variables: dict[str, Any], *, input_format: str = "pixels"):
    """`images -> logits` of the eval-mode `model` with `variables` (closed over: constants).

    images: float32 `[B, S, S, 3]` NHWC in the `input_format` convention ("pixels": RGB in
    [0, 255], normalised here as the training pipeline does; "normalized": as the eval
    step gets them). Returns float32 logits `[B, num_classes]`.
    """
    _check_input(input_format)
    variables = jax.tree.map(jnp.asarray, {"params": variables["params"], "batch_stats": variables["batch_stats"]})
    mean, inv_std = normalization_constants()

    def logits(images):
        images = images.astype(jnp.float32)
        if input_format == "pixels":
            images = (images - mean) * inv_std
        return model.apply(variables, images, train=False).astype(jnp.float32)

    return logits


def export_model(
    model,
    variables: dict[str, Any],
    *,
    image_size: int,
    platforms: str | Sequence[str] = ("cpu",),
    input_format: str = "pixels",
) -> jax.export.Exported:
    """The eval-mode `model` as a `jax.export.Exported` with a symbolic batch dimension.

    Takes float32 images `[b, image_size, image_size, 3]` (`input_format` convention, see
    `inference_function`) for any b >= 1 and returns float32 logits `[b, num_classes]`,
    on each of `platforms`. Serialize with `.serialize()`; call after
    `jax.export.deserialize(data)` with `.call(images)`.
    """
    platforms = check_platforms(platforms)
    if not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}.")
    (batch,) = jax.export.symbolic_shape("b")
    images = jax.ShapeDtypeStruct((batch, int(image_size), int(image_size), 3), jnp.float32)
    fn = jax.jit(inference_function(model, variables, input_format=input_format))
    return jax.export.export(fn, platforms=platforms)(images)


def _check_out(out: str, overwrite: bool) -> str:
    """The absolute path of `out` once it is known to be writable; errors say what to do."""
    out = os.path.abspath(os.fspath(out))
    if os.path.isdir(out):
        raise ExportPathError(f"--out {out} is a directory; give the path of the file to write, e.g. {out}/model.jax.")
    if not overwrite:
        for path in (out, sidecar_path(out)):
            if os.path.exists(path):
                raise ExportPathError(
                    f"{path} exists; pass --overwrite (overwrite=True) to replace it, or choose another --out."
                )
    parent = os.path.dirname(out)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise ExportPathError(f"Cannot create the directory of --out {out}: {e}. Choose a writable location.") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportPathError(f"Cannot write to {parent} (the directory of --out); choose a writable location.")
    return out


def _write_atomically(path: str, data: bytes) -> None:
    """`data` to `path` through a temporary file in its directory: never a half-written file.
    A write that fails (disk full, permissions) is an `ExportPathError` naming `path`."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        raise ExportPathError(f"Cannot write {path}: {e.strerror or e}. Nothing was written there.") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _eval_preprocessing(dataset: str | None, image_size: int, config: dict[str, Any] | None) -> str:
    """How the eval pipeline makes an image of `dataset` into the model's input (for the sidecar)."""
    from gg_jax import data

    if dataset == data.DIGITS:
        return f"the whole image resized to {image_size} x {image_size} (bilinear)"
    resize = ((config or {}).get("eval") or {}).get("resize_size") or 256
    return (
        f"shorter side resized to {resize} (bilinear, antialiased), then the central {image_size} x {image_size} crop"
    )


def _check_serializer() -> None:
    """MissingDependencyError unless `jax.export` can serialize (it needs flatbuffers)."""
    try:
        import flatbuffers  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(
            "Serializing a jax.export artifact needs flatbuffers: pip install flatbuffers (in the train extra)."
        ) from e


def export_checkpoint(
    checkpoint: str,
    out: str,
    *,
    platforms: str | Sequence[str] = ("cpu",),
    input_format: str = "pixels",
    image_size: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Export the eval-mode model of `checkpoint` to the file `out`, its sidecar to `out + '.json'`.

    checkpoint: anything `gg_jax.checkpoints.load` reads (a training workdir, one of its
      `checkpoints/<step>` directories, a converted variables directory).
    image_size: the side S of the input images; default: the training run's
      `image_size` (its config.json), else 224.
    Refuses to replace an existing `out` or sidecar unless `overwrite`; checks `out`
    before reading the checkpoint. Returns the sidecar (a dict, also written as JSON).
    """
    from gg_jax import checkpoints  # Orbax: the `train` extra.
    from gg_jax.data.preprocessing import MEAN_RGB, STDDEV_RGB

    platforms = check_platforms(platforms)
    _check_input(input_format)
    out = _check_out(out, overwrite)
    _check_serializer()
    # The model for the platforms it will run on: XLA:CPU's forms only in a CPU-only artifact.
    platform = "cpu" if set(platforms) == {"cpu"} else next(p for p in platforms if p != "cpu")
    model, variables, meta = checkpoints.load(checkpoint, platform=platform)
    config = checkpoints.run_config(checkpoint)
    if image_size is None:
        image_size = int(config["image_size"]) if config and config.get("image_size") else DEFAULT_IMAGE_SIZE
    exported = export_model(model, variables, image_size=image_size, platforms=platforms, input_format=input_format)
    serialized = exported.serialize()
    num_classes = int(meta["num_classes"])
    sidecar = {
        "format": "jax.export",
        "artifact": os.path.basename(out),
        "model": meta["model"],
        "model_options": dict(meta.get("model_options") or {}),
        "num_classes": num_classes,
        "dataset": meta.get("dataset"),
        "step": meta.get("step"),
        "checkpoint": os.path.abspath(checkpoint),
        "platforms": list(exported.platforms),
        "image_size": int(image_size),
        "eval_preprocessing": _eval_preprocessing(meta.get("dataset"), int(image_size), config),
        "input": {
            "convention": input_format,
            "shape": ["batch", int(image_size), int(image_size), 3],
            "dtype": "float32",
            "layout": "NHWC, RGB",
            "description": (
                "RGB pixel values in [0, 255] (cast uint8 images to float32); the artifact normalises them"
                if input_format == "pixels"
                else "normalised images: (pixels / 255 - mean_rgb) / stddev_rgb, per RGB channel"
            ),
            "mean_rgb": list(MEAN_RGB),
            "stddev_rgb": list(STDDEV_RGB),
        },
        "output": {"name": "logits", "shape": ["batch", num_classes], "dtype": "float32"},
        "calling_convention_version": int(exported.calling_convention_version),
        "jax_version": jax.__version__,
        "usage": "exported = jax.export.deserialize(open(ARTIFACT, 'rb').read()); logits = exported.call(images)",
    }
    _check_out(out, overwrite)  # Again: the checkpoint took a while to read and export.
    _write_atomically(out, bytes(serialized))
    _write_atomically(sidecar_path(out), (json.dumps(sidecar, indent=2, sort_keys=True) + "\n").encode())
    return sidecar


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.ArgumentParser(
        prog="python -m gg_jax.export",
        description="Export a gg_jax checkpoint's eval-mode model as a serialized jax.export artifact "
        "(symbolic batch dimension, weights inside), callable with only jax installed.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="training workdir, one of its checkpoints/<step> directories, or a converted variables directory",
    )
    p.add_argument("--out", required=True, help="artifact file to write; its sidecar goes to OUT.json")
    p.add_argument(
        "--platforms",
        default="cpu",
        help=f"comma-separated platforms the artifact runs on, from {', '.join(PLATFORMS)} (default: cpu)",
    )
    p.add_argument(
        "--input",
        choices=INPUTS,
        default="pixels",
        help="pixels: RGB values in [0, 255], normalised inside (default); "
        "normalized: images already normalised as the eval pipeline does",
    )
    p.add_argument(
        "--image_size",
        type=int,
        default=None,
        help=f"side of the square input images (default: the training run's image_size, else {DEFAULT_IMAGE_SIZE})",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file and its sidecar")
    args = p.parse_args(argv)
    try:
        platforms = check_platforms(args.platforms)
    except ValueError as e:
        p.error(str(e))
    if args.image_size is not None and args.image_size < 1:
        p.error(f"--image_size must be positive, got {args.image_size}.")
    sidecar = export_checkpoint(
        args.checkpoint,
        args.out,
        platforms=platforms,
        input_format=args.input,
        image_size=args.image_size,
        overwrite=args.overwrite,
    )
    out = os.path.abspath(args.out)
    step = f", step {sidecar['step']}" if sidecar.get("step") is not None else ""
    size = os.path.getsize(out)
    print(f"Exported {sidecar['model']} ({sidecar['num_classes']} classes{step}) -> {out} ({size:,} bytes)")
    print(
        f"  input: float32 [batch, {sidecar['image_size']}, {sidecar['image_size']}, 3], {args.input}; "
        f"output: float32 logits [batch, {sidecar['num_classes']}]; platforms: {', '.join(sidecar['platforms'])}"
    )
    print(f"  sidecar: {sidecar_path(out)}")
    return 0


if __name__ == "__main__":
    cli.run_tool(main)
