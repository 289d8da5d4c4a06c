"""The images a diagnosis runs on, preprocessed as the eval pipeline does, and the model's activations."""

from __future__ import annotations

import glob
import os

import jax
import numpy as np

from gg_jax.diagnose.fit import DEFAULT_NUM_IMAGES, DiagnoseError


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
        raise DiagnoseError(f"num_images must be >= 1, got {num_images}.")
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
        raise DiagnoseError(
            f"--images={images}: no image files found (a folder, a glob such as 'photos/*.jpg', comma-separated "
            "files, or a dataset name such as 'digits')."
        )
    out = [pp.eval_image(f, image_size=image_size, resize_size=resize_size) for f in files]
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
