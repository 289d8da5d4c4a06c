"""The re-weighting of the 3G head: the learned unrolling module (paper Sec. 3.2.2, Eqns. 12-13)
and the exact steps of Eqn. (9) (`mggd.reweighted_covariance`)."""

from __future__ import annotations

import functools
import math
from typing import Literal

import flax.linen as nn
import jax.numpy as jnp

from gg_jax import linalg, mggd
from gg_jax.backbones import blocks
from gg_jax.layers.common import (
    COV_EPS,
    MATMUL_PRECISION,
    ConvModule,
    Dtype,
    check_feature_map,
    check_options,
    check_param_channels,
    flatten_positions,
    is_int,
    is_number,
)

ReweightingVariant = Literal["3g", "urm_v1", "urm_v2"]
NUM_BLOCKS = ("num_blocks", lambda v: is_int(v, 0), "an integer >= 0 (re-weighting blocks T)")
HIDDEN = ("hidden", lambda v: is_int(v, 1), "an integer >= 1 (channels inside a re-weighting block)")
_BLOCK_REWEIGHTING = ("reweighting", lambda v: v in ("3g", "urm_v1", "urm_v2"), "'3g', 'urm_v1' or 'urm_v2'")


def check_learn_c(module) -> None:
    if module.exact_learn_c and not (module.exact_c is not None and module.exact_c > 0):
        raise ValueError(
            f"{type(module).__name__}: exact_learn_c=True needs the initial exact_c > 0, "
            f"got exact_c={module.exact_c!r}."
        )


EXACT_RULES = (
    ("exact_beta", lambda v: v is None or (is_number(v) and v > 0), "None (learned) or a number > 0"),
    ("exact_c", lambda v: v is None or (is_number(v) and v >= 0), "None (Eqn. (7)'s c_n) or a number >= 0"),
    ("exact_num_iters", lambda v: v is None or is_int(v, 1), "an integer >= 1 (Newton-Schulz iterations)"),
)
#: `GeneralizedGaussianCovariance.reweighting`: a learned block variant, or "exact" (`ExactReweighting`).
HeadReweighting = Literal["3g", "urm_v1", "urm_v2", "exact"]


class ReweightingBlock(ConvModule):
    """One re-weighted block of the unrolling re-weighting module (paper Fig. 3, Eqns. 12-13).

    Approximates the generalized-Gaussian weights of Eqn. (9) with 1x1 convolutions,
    exactly as the reference block (`AtMp{t}`; submodule names are the checkpoint's):

        a = BN(map1(Xh)) * BN(map2(Xh))
        z = ReLU(a + BN(map21(X)))                 # map21 reads X, not Xh
        b = ReLU(BN(map3(z))) * ReLU(BN(map4(z)))
        s = atmap2(ReLU(BN(atmap1(b))))            # C -> hidden (BN) -> 1, no BN
        w = sigmoid(s + atmap3(s))                 # atmap3: 1 -> 1, the c * L^(1-beta) term
        return Xh * w                              # one weight per position

    `reweighting` selects the ablations of Sec. 4.2 / Fig. 5: "urm_v1" computes
    `w = sigmoid(atmap2(ReLU(BN(atmap1(Xh)))))` (a plain spatial-attention map),
    "urm_v2" first forms `a = BN(map1(Xh)) * BN(map2(Xh))` and then `w` from `a` the same
    way. Both ignore X.

    Call: `block(x_hat, x, train=...)` with NHWC `x_hat` (running features) and `x`
    (the block input X of the module; defaults to `x_hat`). Returns `x_hat * w` in `dtype`.
    """

    hidden: int = 64
    reweighting: ReweightingVariant = "3g"
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        check_options(self, [HIDDEN, _BLOCK_REWEIGHTING])
        super().__post_init__()

    @nn.compact
    def __call__(self, x_hat, x=None, *, train: bool):
        check_feature_map(x_hat, "ReweightingBlock")
        check_param_channels(self, x_hat, "atmap1", "ReweightingBlock")  # atmap1: C -> hidden in every variant
        x = x_hat if x is None else x
        c = x_hat.shape[-1]
        conv = functools.partial(self.conv1x1, dtype=self.dtype)
        bn = functools.partial(blocks.batch_norm, train, self.dtype)
        # map1/map2 (and map3/map4) read the same input: one convolution each pair.
        pair = functools.partial(self.conv1x1_parallel, features=c, dtype=self.dtype)
        if self.reweighting == "3g":
            m1, m2 = pair(x_hat, names=("map1", "map2"))
            a = bn(name="bn1")(m1) * bn(name="bn2")(m2)
            z = nn.relu(a + bn(name="bn21")(conv(c, name="map21")(x)))
            m3, m4 = pair(z, names=("map3", "map4"))
            feat = nn.relu(bn(name="bn3")(m3)) * nn.relu(bn(name="bn4")(m4))
        elif self.reweighting == "urm_v2":
            m1, m2 = pair(x_hat, names=("map1", "map2"))
            feat = bn(name="bn1")(m1) * bn(name="bn2")(m2)
        else:  # "urm_v1"
            feat = x_hat
        s = conv(1, name="atmap2")(nn.relu(bn(name="bnat1")(conv(self.hidden, name="atmap1")(feat))))
        if self.reweighting == "3g":
            s = s + conv(1, name="atmap3")(s)
        w = nn.sigmoid(s)
        return x_hat * w.astype(x_hat.dtype)


class _ScannedReweightingBlock(ConvModule):
    """`ReweightingBlock` as a scan body: carry `Xh`, broadcast `X`, emit each output."""

    hidden: int
    reweighting: ReweightingVariant
    train: bool
    dtype: Dtype

    @nn.compact
    def __call__(self, x_hat, x):
        block = ReweightingBlock(self.hidden, self.reweighting, self.dtype, conv=self.conv, name="block")
        out = block(x_hat, x, train=self.train)
        return out, out


class UnrolledReweighting(ConvModule):
    """Unrolling re-weighting module: `num_blocks` re-weighted blocks with separate weights.

    Block t maps `Xh_{t-1} -> Xh_t` (with `Xh_0 = X`) and always also reads `X`
    (paper Sec. 3.2.2, Fig. 2). Built with `nn.scan`: the blocks' parameters and batch
    statistics are stacked on a leading axis of length `num_blocks`
    (e.g. `blocks/block/map1/kernel` has shape `[T, 1, 1, C, C]`). The per-block outputs
    `[T, B, H, W, C]` are sown as `intermediates/reweighted`.

    Call: `module(x, train=...)` -> `[B, H, W, C]` in `dtype`. `num_blocks=0` is the identity.

    `unroll=True` (default) unrolls the scan in the compiled program (the parameters stay
    stacked): XLA sees each block's parameters as static slices instead of the rolled
    loop's dynamic ones. `unroll=False` keeps a compact loop.
    """

    num_blocks: int = 3
    hidden: int = 64
    reweighting: ReweightingVariant = "3g"
    dtype: Dtype = jnp.float32
    unroll: bool = True

    def __post_init__(self):
        check_options(self, [NUM_BLOCKS, HIDDEN, _BLOCK_REWEIGHTING])
        super().__post_init__()

    @nn.compact
    def __call__(self, x, *, train: bool):
        check_feature_map(x, "UnrolledReweighting")
        if self.num_blocks == 0:
            return x
        x = x.astype(self.dtype)
        scanned = nn.scan(
            _ScannedReweightingBlock,
            variable_axes={"params": 0, "batch_stats": 0},
            split_rngs={"params": True},
            in_axes=nn.broadcast,
            length=self.num_blocks,
            unroll=self.num_blocks if self.unroll else 1,
        )(self.hidden, self.reweighting, train, self.dtype, conv=self.conv, name="blocks")
        out, per_block = scanned(x, x)
        self.sow("intermediates", "reweighted", per_block)
        return out


class ExactReweighting(nn.Module):
    """The T re-weighting steps of paper Eqn. (9) computed exactly, not learned (`mggd.reweighted_covariance`).

    Each step forms `Y = X^T Sigma^{-1} X` with `Sigma^{-1/2}` from Newton-Schulz (Eqn. 10),
    weights `w = N d / (diag(Y) + c diag(Y)^{1-beta})` (rescaled to mean 1) and the weighted
    covariance `Sigma_t = 1/N sum_n w_n xc_n xc_n^T + eps I` of the centred positions; the result
    is `Sigma_T`, the covariance that the head then takes the root of. No BatchNorm, no 1x1 convs.
    The fields are the 3G head's options of the same names (`GeneralizedGaussianCovariance`).

    Attributes:
      num_blocks: T; 0 returns the plain covariance (`linalg.covariance`).
      exact_beta: the MGGD shape beta, fixed (> 0); None learns it as the parameter `log_beta`
        (beta = exp(log_beta), initialised at 1: the plain covariance when `exact_c` is None).
      exact_c: None for Eqn. (7)'s per-position `c_n = sum_{j != n} y_j^beta` (each step is
        the exact fixed-point step of Eqn. (3)); a constant `c >= 0` shared by all positions
        (Eqn. (9) as the learned block approximates it).
      exact_learn_c: learn the constant c as the parameter `log_c` (c = exp(log_c) > 0),
        initialised at `exact_c` (which must then be > 0).
      exact_num_iters: Newton-Schulz iterations of each inverse root.
      cov_eps: ridge eps of every `Sigma_t`.
      unroll: unroll the scan over the T steps.
      matmul_precision: the float32 product setting of every product (`gg_jax.linalg`).

    Call: `module(x)` with NHWC `x` `[B, H, W, C]` -> `Sigma_T` `[B, C, C]` float32. Intermediates:
    `weights` `[T, B, H, W]` and `reweighted` `[T, B, H, W, C]` (`sqrt(w_t)` times the centred map,
    whose second moment is `Sigma_t - eps I`). `module(x, scaled=True)` (the 3G head's call) returns
    `(Sigma_T / unit^2, unit [B, 1, 1])`, computed from `linalg.scale_features(x)` with ridge
    `eps / unit^2` (the weights do not depend on the scale): `unit = 1` for features below 2^16,
    and no overflow for any finite features (`Sigma_T` itself overflows float32 from about 1e18).
    """

    num_blocks: int = 3
    exact_beta: float | None = None
    exact_c: float | None = None
    exact_learn_c: bool = False
    exact_num_iters: int = 5
    cov_eps: float = 1e-7
    unroll: bool = True
    matmul_precision: linalg.MatmulPrecision = "auto"

    def __post_init__(self):
        check_options(self, [NUM_BLOCKS, *EXACT_RULES, COV_EPS, MATMUL_PRECISION])
        check_learn_c(self)
        super().__post_init__()

    @nn.compact
    def __call__(self, x, *, scaled: bool = False):
        check_feature_map(x, "ExactReweighting")
        if self.exact_beta is None:
            beta = jnp.exp(self.param("log_beta", nn.initializers.zeros, (), jnp.float32))
        else:
            beta = self.exact_beta
        if self.exact_learn_c:
            c = jnp.exp(self.param("log_c", nn.initializers.constant(math.log(self.exact_c)), (), jnp.float32))
        else:
            c = self.exact_c
        b, h, w, ch = x.shape
        features = flatten_positions(x)
        features = features.astype(linalg.compute_dtype(features.dtype))
        if scaled:
            small, unit = linalg.scale_features(features)
        else:
            small, unit = features, 1.0
        sigma, weights = mggd.reweighted_covariance(
            small,
            num_steps=self.num_blocks,
            beta=beta,
            c=c,
            num_iters=self.exact_num_iters,
            eps=self.cov_eps / unit / unit if scaled else self.cov_eps,
            unroll=self.unroll,
            matmul_precision=self.matmul_precision,
        )
        centred = features - jnp.mean(features, axis=1, keepdims=True)
        self.sow("intermediates", "weights", weights.reshape((-1, b, h, w)))
        self.sow("intermediates", "reweighted", (jnp.sqrt(weights)[..., None] * centred).reshape((-1, b, h, w, ch)))
        return (sigma, unit) if scaled else sigma
