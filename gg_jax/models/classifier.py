"""An image classifier: a backbone, a global pooling head and a linear classifier."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from gg_jax import layers

Dtype = Any


def torch_linear_init(fan_in: int):
    """PyTorch's default nn.Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for the kernel and the bias."""
    bound = 1.0 / fan_in**0.5

    def init(key, shape, dtype=jnp.float32):
        return nn.initializers.uniform(2 * bound)(key, shape, dtype) - bound

    return init


def check_dropout_rate(rate) -> None:
    """ValueError unless `rate` is in [0, 1)."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        raise ValueError(f"Classifier: dropout_rate={rate!r} must be in [0, 1) (the share of features dropped).")


class Classifier(nn.Module):
    """NHWC images `[B, H, W, 3]` -> float32 logits `[B, num_classes]`.

    Attributes:
      backbone: a module `backbone(images, train=...) -> [B, h, w, C]` (`gg_jax.backbones`).
        Its variables sit at the top level of the model's (`conv1`, `layer1_0`, ...), as in the
        reference's state_dict.
      head: a `gg_jax.layers` head, called as `head(features, train=...)` -> `[B, D]` float32;
        its variables are under `head`.
      num_classes: outputs of the classifier `fc` (float32, PyTorch's default init).
      dropout_rate: dropout before the classifier in training mode (the released 3G-Net
        training code uses 0.2; needs a 'dropout' rng when > 0 and train=True).
      dtype: the compute dtype (the backbone and the head have their own).

    Intermediates (`mutable=['intermediates']`): `layer4` (the backbone's output) and the
    head's own under `head/`.
    """

    backbone: nn.Module
    head: nn.Module
    num_classes: int
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        check_dropout_rate(self.dropout_rate)
        super().__post_init__()

    def setup(self):
        nn.share_scope(self, self.backbone)

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        layers.check_feature_map(x, type(self).__name__, None)
        if x.shape[-1] != 3:
            raise ValueError(f"Expected NHWC images with 3 channels, got shape {x.shape}.")
        features = self.backbone(x, train=train)
        features = self.head(features, train=train)
        if self.dropout_rate > 0:
            features = nn.Dropout(self.dropout_rate, deterministic=not train)(features)
        init = torch_linear_init(features.shape[-1])
        fc = nn.Dense(
            self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32, kernel_init=init, bias_init=init, name="fc"
        )
        return fc(features.astype(jnp.float32))
