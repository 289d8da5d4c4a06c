"""Lazy, CPU-only TensorFlow / TFDS imports for the input pipelines.

`import gg_jax` and `import gg_jax.data` never import TensorFlow; the first
pipeline call does. TensorFlow is then restricted to the CPU, so that it never
reserves GPU memory that JAX needs (TPUs are not visible to TensorFlow unless
the full `tensorflow` package with TPU support is installed, and even then the
pipeline ops are all placed on the CPU).
"""

from __future__ import annotations

import os

_TF = None
_TFDS = None


def tf():
    """Returns the `tensorflow` module, imported on first use, with no GPU visible."""
    global _TF
    if _TF is None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
        import tensorflow  # pylint: disable=g-import-not-at-top

        try:
            tensorflow.config.set_visible_devices([], "GPU")
        except (RuntimeError, ValueError):
            # Devices were already initialised by someone else; TensorFlow then keeps
            # the GPUs it has, which the caller chose. Nothing we can do here.
            pass
        _TF = tensorflow
    return _TF


def tfds():
    """Returns `tensorflow_datasets`, imported on first use (after `tf()`)."""
    global _TFDS
    if _TFDS is None:
        tf()
        import tensorflow_datasets  # pylint: disable=g-import-not-at-top

        _TFDS = tensorflow_datasets
    return _TFDS
