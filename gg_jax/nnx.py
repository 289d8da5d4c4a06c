"""The heads of `gg_jax.layers` as Flax NNX modules.

    from flax import nnx
    import gg_jax.nnx

    head = gg_jax.nnx.GeneralizedGaussianCovariance(in_features=2048, reduction_dim=256, rngs=nnx.Rngs(0))
    features = head(x)            # x [B, H, W, 2048] -> [B, 256 * 257 / 2] float32, batch statistics
    head.eval()                   # BatchNorm uses (and no longer updates) the running averages
    features = head(x)

Each class wraps the linen head of the same name with `flax.nnx.bridge.ToNNX`: one
implementation of the math, so an NNX head gives the linen head's numbers for the same
weights. The NNX calling convention: the constructor takes `in_features=` (the input
width), the linen head's options (`reduction_dim`, `num_blocks`, `num_iters`, `lam`,
`dtype`, ... : any field of the linen class, forwarded as is) and `rngs=`; the variables
are created in the constructor. `model.train()` / `model.eval()` (or
`nnx.view(model, use_running_average=...)`) switch every BatchNorm of the head between
batch statistics, which update the running averages on each call, and the running
averages. New heads start in training mode, as `nnx.BatchNorm` does.

Variables: `head.linen` holds them under the linen head's variable names (e.g.
`head.linen.reduce['layer_reduce']['kernel']`, an `nnx.Param`; running averages are
`nnx.BatchStat`). `head.load_linen_variables(variables)` copies linen variables
`{'params': ..., 'batch_stats': ...}` in (a converted checkpoint's
`variables['params']['head']` and `variables['batch_stats']['head']`, for instance) and
`head.linen_variables()` gives them back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from flax.core import unfreeze

from gg_jax import cpu, layers, models
from gg_jax.backbones import blocks

__all__ = [
    "BilinearPooling",
    "ChannelReduction",
    "CovariancePooling",
    "GaussianEmbedding",
    "GeneralizedGaussianCovariance",
    "GlobalAveragePooling",
    "ReweightingBlock",
    "UnrolledReweighting",
]

# Spatial size of the zero feature map that the constructor traces the linen head's
# initialisation with: the variables depend on the channel count only.
_INIT_SIZE = 4


class _LinenHead(nnx.Module):
    """An NNX module around one linen head of `gg_jax.layers` (`flax.nnx.bridge.ToNNX`).

    Subclasses set `_linen_cls` and define `__call__` (through `_apply`).
    """

    _linen_cls: type = None  # type: ignore[assignment]

    def __init__(self, in_features: int, *, rngs: nnx.Rngs, use_running_average: bool = False, **options: Any):
        name = type(self).__name__
        if isinstance(in_features, bool) or not isinstance(in_features, (int, np.integer)) or in_features < 1:
            raise ValueError(f"{name}: in_features must be a positive int (the input channels), got {in_features!r}.")
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"{name}: rngs must be an nnx.Rngs (e.g. rngs=nnx.Rngs(0)), got {type(rngs).__name__}.")
        valid = blocks.module_options(self._linen_cls, exclude=("in_features",))
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise TypeError(f"{name} got unknown option(s) {unknown}. Valid options: {', '.join(valid)}.")
        if "in_features" in blocks.module_options(self._linen_cls):
            options["in_features"] = int(in_features)
        self.in_features = int(in_features)
        self.use_running_average = bool(use_running_average)
        linen_head = self._linen_cls(**options)
        # Traced into the caller's program when built under nnx.jit / nnx.eval_shape.
        variables = models.init_variables(
            linen_head,
            rngs.params(),
            (1, _INIT_SIZE, _INIT_SIZE, self.in_features),
            compiler_options=cpu.init_compiler_options(jax.default_backend()),
        )
        # The heads draw no random numbers when applied: the bridge keeps no RNG state.
        self.linen = nnx.bridge.ToNNX(linen_head)
        # Stored as `ToNNX.lazy_init` stores them: one attribute per top-level name, the
        # collections as variable types (`params` -> nnx.Param, `batch_stats` -> nnx.BatchStat).
        flat = {}
        for collection, tree in variables.items():
            variable_type = nnx.variable_type_from_name(collection, allow_register=True)
            for path, value in traverse_util.flatten_dict(unfreeze(tree)).items():
                flat[path] = variable_type(value)
        for attr, value in traverse_util.unflatten_dict(flat).items():
            setattr(self.linen, attr, nnx.data(value))

    @property
    def linen_module(self):
        """The wrapped linen head (a `gg_jax.layers` module) with this head's options."""
        return self.linen.to_nnx__module

    def set_view(self, use_running_average: bool | None = None):
        """Used by `nnx.view`.

        Args:
          use_running_average: True uses the BatchNorm running averages (eval mode), False
            the batch statistics, updating the running averages (training mode).
        """
        if use_running_average is not None:
            self.use_running_average = bool(use_running_average)

    def _apply(self, *args):
        layers.check_feature_map(args[0], type(self).__name__, self.in_features)
        if self.use_running_average:
            return self.linen(*args, train=False, mutable=False)
        return self.linen(*args, train=True, mutable=["batch_stats"])

    def _variables(self) -> dict[tuple[str, ...], nnx.Variable]:
        """`{(collection, *linen path): variable}` of the wrapped head."""
        out = {}
        for path, value in nnx.iter_graph(self.linen):
            if isinstance(value, nnx.Variable) and not isinstance(value, nnx.RngState):
                out[(nnx.variable_name_from_type(type(value)), *map(str, path))] = value
        return out

    def linen_variables(self) -> dict[str, Any]:
        """The head's variables as the linen head's: `{'params': ..., 'batch_stats': ...}` of arrays."""
        return traverse_util.unflatten_dict({k: v.get_value() for k, v in self._variables().items()})

    def load_linen_variables(self, variables: Mapping[str, Any]) -> None:
        """Set every variable from linen variables of the same head (`linen_head.init(...)`).

        `variables` is `{'params': ..., 'batch_stats': ...}` (nested dicts of arrays, as
        `init` returns them or a checkpoint holds them). Every variable of this head must be
        there with its shape and nothing else; values are cast to the variables' dtypes.
        Raises ValueError otherwise, naming the paths.
        """
        given = traverse_util.flatten_dict(unfreeze(dict(variables)))
        given = {tuple(map(str, k)): v for k, v in given.items()}
        current = self._variables()
        missing = sorted("/".join(k) for k in current.keys() - given.keys())
        extra = sorted("/".join(k) for k in given.keys() - current.keys())
        if missing or extra:
            raise ValueError(
                f"{type(self).__name__}.load_linen_variables: the variables do not match this head's "
                f"(missing: {missing or 'none'}; not in this head: {extra or 'none'}). Pass the "
                "{'params', 'batch_stats'} of a linen gg_jax.layers head with the same options."
            )
        for key, var in current.items():
            value = jnp.asarray(given[key])
            if value.shape != var.get_value().shape:
                raise ValueError(
                    f"{type(self).__name__}.load_linen_variables: {'/'.join(key)} has shape {value.shape}, "
                    f"this head's has {var.get_value().shape} (other in_features or options?)."
                )
            var.set_value(value.astype(var.get_value().dtype))


class GeneralizedGaussianCovariance(_LinenHead):
    """The 3G head (`gg_jax.layers.GeneralizedGaussianCovariance`) as an NNX module.

    Options as the linen head: `num_blocks` (T re-weighting blocks), `num_iters`, `lam`,
    `reweighting`, `hidden`, `estimator`, `sqrt_method`, `cov_eps`, `reduction_dim`,
    `lower_triangle`, `dtype`, ...

    Call: `head(x)` with NHWC `x` `[B, H, W, in_features]` -> `[B, C(C+1)/2]` float32
    (C = reduction_dim, or in_features without a reduction); the covariance and the square
    root run in float32 whatever `dtype`, their products at `matmul_precision` ("auto": the
    platform's float32-accurate default, `gg_jax.linalg.default_matmul_precision`).
    """

    _linen_cls = layers.GeneralizedGaussianCovariance

    def __call__(self, x: jax.Array) -> jax.Array:
        return self._apply(x)


class CovariancePooling(_LinenHead):
    """iSQRT-COV / MPN-COV / plain covariance pooling (`gg_jax.layers.CovariancePooling`) as an NNX module.

    Options as the linen head: `method` ("isqrt", "mpncov", "plain"), `num_iters`, `power`,
    `cov_eps`, `reduction_dim`, `lower_triangle`, `dtype`, ...

    Call: `head(x)` with `[B, H, W, in_features]` -> `[B, C(C+1)/2]` float32.
    """

    _linen_cls = layers.CovariancePooling

    def __call__(self, x: jax.Array) -> jax.Array:
        return self._apply(x)


class BilinearPooling(_LinenHead):
    """B-CNN pooling (`gg_jax.layers.BilinearPooling`) as an NNX module.

    Options as the linen head: `batch_norm`, `reduction_dim`, `dtype`, ...

    Call: `head(x)` with `[B, H, W, in_features]` -> `[B, C*C]` float32.
    """

    _linen_cls = layers.BilinearPooling

    def __call__(self, x: jax.Array) -> jax.Array:
        return self._apply(x)


class GaussianEmbedding(_LinenHead):
    """G2DeNet global Gaussian embedding (`gg_jax.layers.GaussianEmbedding`) as an NNX module.

    Options as the linen head: `sqrt_method`, `num_iters`, `cov_eps`, `reduction_dim`,
    `lower_triangle`, `dtype`, ...

    Call: `head(x)` with `[B, H, W, in_features]` -> `[B, (C+1)(C+2)/2]` float32.
    """

    _linen_cls = layers.GaussianEmbedding

    def __call__(self, x: jax.Array) -> jax.Array:
        return self._apply(x)


class GlobalAveragePooling(_LinenHead):
    """Global average pooling (`gg_jax.layers.GlobalAveragePooling`) as an NNX module.

    Options as the linen head: `reduction_dim`, `dtype`, ...

    Call: `head(x)` with `[B, H, W, in_features]` -> `[B, C]` float32.
    """

    _linen_cls = layers.GlobalAveragePooling

    def __call__(self, x: jax.Array) -> jax.Array:
        return self._apply(x)


class ChannelReduction(_LinenHead):
    """1x1 conv -> BN -> ReLU to `features` channels (`gg_jax.layers.ChannelReduction`) as an NNX module.

    Options as the linen module: `features` (256), `dtype`.

    Call: `module(x)` with `[B, H, W, in_features]` -> `[B, H, W, features]` in `dtype`.
    """

    _linen_cls = layers.ChannelReduction

    def __call__(self, x: jax.Array) -> jax.Array:
        return self._apply(x)


class ReweightingBlock(_LinenHead):
    """One re-weighted block (`gg_jax.layers.ReweightingBlock`, paper Eqns. 12-13) as an NNX module.

    Options as the linen module: `hidden`, `reweighting` ("3g", "urm_v1", "urm_v2"), `dtype`.

    Call: `block(x_hat, x=None)` with NHWC `x_hat` `[B, H, W, in_features]` (the running
    features) and `x` (the module input X, same shape; defaults to `x_hat`) -> `x_hat`
    times one weight per position, `[B, H, W, in_features]` in `dtype`.
    """

    _linen_cls = layers.ReweightingBlock

    def __call__(self, x_hat: jax.Array, x: jax.Array | None = None) -> jax.Array:
        return self._apply(x_hat, x)


class UnrolledReweighting(_LinenHead):
    """The unrolling re-weighting module (`gg_jax.layers.UnrolledReweighting`) as an NNX module.

    Options as the linen module: `num_blocks`, `hidden`, `reweighting`, `dtype`, `unroll`. The
    blocks' variables are stacked on a leading axis of length `num_blocks`.

    Call: `module(x)` with `[B, H, W, in_features]` -> `[B, H, W, in_features]` in `dtype`.
    """

    _linen_cls = layers.UnrolledReweighting

    def __call__(self, x: jax.Array) -> jax.Array:
        return self._apply(x)
