"""The pooling heads: the 3G layer (paper Sec. 3) and the global pooling baselines (Table 2)."""

from __future__ import annotations

import math
from typing import Literal

import flax.linen as nn
import jax.numpy as jnp

from gg_jax import linalg
from gg_jax.backbones import blocks
from gg_jax.layers.common import (
    COV_EPS,
    IN_FEATURES,
    MATMUL_PRECISION,
    NUM_ITERS,
    REDUCTION_DIM,
    SQRT_METHOD,
    ConvModule,
    Dtype,
    check_feature_map,
    check_options,
    check_param_channels,
    flatten_positions,
    is_int,
    is_number,
)
from gg_jax.layers.reweighting import (
    EXACT_RULES,
    HIDDEN,
    NUM_BLOCKS,
    ExactReweighting,
    HeadReweighting,
    UnrolledReweighting,
    check_learn_c,
)


class ChannelReduction(ConvModule):
    """1x1 conv -> BN -> ReLU to `features` channels (reference head step 1)."""

    features: int = 256
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        check_options(self, [("features", lambda v: is_int(v, 1), "an integer >= 1")])
        super().__post_init__()

    @nn.compact
    def __call__(self, x, *, train: bool):
        check_param_channels(self, x, "layer_reduce", "ChannelReduction")
        x = self.conv1x1(self.features, self.dtype, name="layer_reduce")(x)
        x = blocks.batch_norm(train, self.dtype, name="layer_reduce_bn")(x)
        return nn.relu(x)


SqrtMethod = Literal["newton_schulz", "eigh"]


def _matrix_root(s, method: SqrtMethod, num_iters: int, lam: float, matmul_precision, unit=None):
    """The root of `s`, or with `unit` that of `unit^2 s` (`linalg.scaled_covariance`)."""
    if lam != 1.0:
        return linalg.regularized_sqrtm(
            s, lam, method=method, num_iters=num_iters, matmul_precision=matmul_precision, unit=unit
        )
    if method == "newton_schulz":
        return linalg.sqrtm_newton_schulz(s, num_iters, matmul_precision=matmul_precision, unit=unit)
    return linalg.sqrtm_eigh(s, 0.5, matmul_precision=matmul_precision) * (1.0 if unit is None else unit)


class _HeadBase(ConvModule):
    """Shared options: optional channel reduction and an input check."""

    def _prepare(self, x, train: bool, layer: str):
        check_feature_map(x, layer, getattr(self, "in_features", None))
        if getattr(self, "reduction_dim", None):
            x = ChannelReduction(self.reduction_dim, self.dtype, conv=self.conv, name="reduce")(
                x.astype(self.dtype), train=train
            )
            self.sow("intermediates", "reduced", x)
        return x


class GeneralizedGaussianCovariance(_HeadBase):
    """Global covariance of generalized Gaussian layer (the 3G head, paper Sec. 3).

    Re-weighting (`UnrolledReweighting`, T = `num_blocks`), covariance of the weighted
    features (reference step 3), robust estimator of Theorem 1 by Newton-Schulz
    (`lam = 1`: plain iSQRT square root, reference step 4) and vectorisation of the
    `i >= j` triangle (step 5).

    Options covering the paper's ablations:
      num_blocks: T = 0..N re-weighted blocks (T = 0 is iSQRT-COV).
      reweighting: "3g" (the paper's block), "urm_v1", "urm_v2" (Fig. 5), or "exact": the T
        steps of Eqn. (9) computed rather than learned (`ExactReweighting`), configured by
        exact_beta: the MGGD shape (> 0); None (default) learns it (`log_beta`, starts at 1);
        exact_c: None (default) for Eqn. (7)'s per-position c_n (exact fixed-point steps of
          Eqn. (3); with beta = 1 the weights are 1 and the head is iSQRT-COV); a constant
          c >= 0 for all positions;
        exact_learn_c: learn the constant c (`log_c`), starting at exact_c (> 0);
        exact_num_iters: Newton-Schulz iterations of the inverse roots (None: num_iters).
      estimator: False drops the square root ("3G-Net w/o Estimator (5)").
      lam: regularisation of Theorem 1, in (0, 1].
      sqrt_method: "newton_schulz" (iSQRT, `num_iters` iterations) or "eigh".
      reduction_dim: if set, a 1x1 conv -> BN -> ReLU to this many channels first
        (reference step 1; the 3G-Net models put it in the model, as the reference does).
      in_features: if set, the expected number of input channels (checked).
      lower_triangle: vector order, True for the reference's `i >= j`.
      matmul_precision: the covariance's and root's float32 product setting, "auto"
        (the platform's default), "highest", "bf16_6x" or "tf32_3x" (`gg_jax.linalg`).

    Call: `head(x, train=...)` with NHWC `x` `[B, H, W, C]` -> `[B, C(C+1)/2]` float32.
    Intermediates (`apply(..., mutable=['intermediates'])`): `reduced` (with `reduction_dim`),
    `reweighting/reweighted` (and `reweighting/weights` for "exact"), `covariance`, `sqrt`.

    Valid range: the covariance, its root and the exact re-weighting take any finite features.
    Those of a sample beyond 2^16 in magnitude are divided by a power of two first and the
    root scaled back (`linalg.scaled_covariance`; exact, so the output is that of the
    unscaled computation wherever that is finite), so the output stays finite where the
    covariance (in squared units) overflows float32, from features around 1e18; the
    `covariance` intermediate (and the output with `estimator=False`) is then inf. In eval
    mode BatchNorm applies its running averages, which do not follow the input's scale: the
    learned blocks ("3g", "urm_v2") multiply BatchNorm outputs (their values grow as the 4th
    power of the input's scale in "3g"), so features beyond about 1e9 times the scale the
    running averages were collected at overflow float32 there and give NaN (train mode
    normalises by the batch's statistics and has no such limit).
    """

    num_blocks: int = 3
    num_iters: int = 5
    lam: float = 1.0
    reweighting: HeadReweighting = "3g"
    hidden: int = 64
    estimator: bool = True
    sqrt_method: SqrtMethod = "newton_schulz"
    cov_eps: float = 1e-7
    reduction_dim: int | None = None
    in_features: int | None = None
    lower_triangle: bool = True
    exact_beta: float | None = None
    exact_c: float | None = None
    exact_learn_c: bool = False
    exact_num_iters: int | None = None
    dtype: Dtype = jnp.float32
    matmul_precision: linalg.MatmulPrecision = "auto"

    def __post_init__(self):
        check_options(
            self,
            [
                NUM_BLOCKS,
                NUM_ITERS,
                ("lam", lambda v: is_number(v) and 0 < v <= 1, "in (0, 1] (Theorem 1's lambda; 1: plain root)"),
                (
                    "reweighting",
                    lambda v: v in ("3g", "urm_v1", "urm_v2", "exact"),
                    "'3g', 'urm_v1', 'urm_v2' or 'exact'",
                ),
                HIDDEN,
                SQRT_METHOD,
                COV_EPS,
                REDUCTION_DIM,
                IN_FEATURES,
                *EXACT_RULES,
                MATMUL_PRECISION,
            ],
        )
        exact = [f for f in ("exact_beta", "exact_c", "exact_num_iters") if getattr(self, f) is not None]
        if self.reweighting != "exact" and (exact or self.exact_learn_c):
            raise ValueError(
                f"GeneralizedGaussianCovariance: {', '.join(exact or ['exact_learn_c'])} only applies with "
                f"reweighting='exact', not {self.reweighting!r}."
            )
        check_learn_c(self)
        super().__post_init__()

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = self._prepare(x, train, "GeneralizedGaussianCovariance")
        # Features of any finite scale: s is the covariance / unit^2 (unit = 1 below 2^16).
        if self.reweighting == "exact":
            s, unit = ExactReweighting(
                self.num_blocks,
                exact_beta=self.exact_beta,
                exact_c=self.exact_c,
                exact_learn_c=self.exact_learn_c,
                exact_num_iters=self.num_iters if self.exact_num_iters is None else self.exact_num_iters,
                cov_eps=self.cov_eps,
                matmul_precision=self.matmul_precision,
                name="reweighting",
            )(x, scaled=True)
        else:
            x = UnrolledReweighting(
                self.num_blocks, self.hidden, self.reweighting, self.dtype, conv=self.conv, name="reweighting"
            )(x, train=train)
            s, unit = linalg.scaled_covariance(flatten_positions(x), self.cov_eps, self.matmul_precision)
        self.sow("intermediates", "covariance", s * unit * unit)
        if self.estimator:
            s = _matrix_root(s, self.sqrt_method, self.num_iters, self.lam, self.matmul_precision, unit)
            self.sow("intermediates", "sqrt", s)
        else:
            s = s * unit * unit
        return linalg.triu_vector(s, lower=self.lower_triangle)


class CovariancePooling(_HeadBase):
    """Global covariance pooling baselines (paper Table 2).

    method:
      "isqrt": iSQRT-COV, square root by `num_iters` Newton-Schulz iterations;
      "mpncov": MPN-COV, matrix power `power` (0.5) by eigendecomposition;
      "plain": the covariance itself ("Plain COV").
    matmul_precision: float32 product setting (`GeneralizedGaussianCovariance`).

    Call: `head(x, train=...)` with `[B, H, W, C]` -> `[B, C(C+1)/2]` float32. Features of any
    finite scale, as the 3G head (`linalg.scaled_covariance`): the output is finite wherever
    the unscaled computation's is representable.
    """

    method: Literal["isqrt", "mpncov", "plain"] = "isqrt"
    num_iters: int = 5
    power: float = 0.5
    cov_eps: float = 1e-7
    reduction_dim: int | None = None
    in_features: int | None = None
    lower_triangle: bool = True
    dtype: Dtype = jnp.float32
    matmul_precision: linalg.MatmulPrecision = "auto"

    def __post_init__(self):
        check_options(
            self,
            [
                ("method", lambda v: v in ("isqrt", "mpncov", "plain"), "'isqrt', 'mpncov' or 'plain'"),
                NUM_ITERS,
                ("power", lambda v: is_number(v) and v > 0, "a number > 0 (MPN-COV's matrix power)"),
                COV_EPS,
                REDUCTION_DIM,
                IN_FEATURES,
                MATMUL_PRECISION,
            ],
        )
        super().__post_init__()

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = self._prepare(x, train, "CovariancePooling")
        # Features of any finite scale: s is the covariance / unit^2 (unit = 1 below 2^16).
        s, unit = linalg.scaled_covariance(flatten_positions(x), self.cov_eps, self.matmul_precision)
        self.sow("intermediates", "covariance", s * unit * unit)
        if self.method == "isqrt":
            s = linalg.sqrtm_newton_schulz(s, self.num_iters, matmul_precision=self.matmul_precision, unit=unit)
        elif self.method == "mpncov":
            s = linalg.sqrtm_eigh(s, self.power, matmul_precision=self.matmul_precision) * unit ** (2 * self.power)
        else:
            s = s * unit * unit
        return linalg.triu_vector(s, lower=self.lower_triangle)


class BilinearPooling(_HeadBase):
    """B-CNN pooling (Lin et al.): `X^T X / N`, signed square root, l2 normalisation.

    The full `C x C` matrix is flattened, as in B-CNN. The paper's B-CNN baseline adds a
    BatchNorm after the normalisation (`batch_norm=True`; its scale starts at 1).
    `matmul_precision`: the Gram product's float32 setting (`GeneralizedGaussianCovariance`).

    Call: `head(x, train=...)` with `[B, H, W, C]` -> `[B, C*C]` float32.
    """

    batch_norm: bool = True
    reduction_dim: int | None = None
    in_features: int | None = None
    dtype: Dtype = jnp.float32
    matmul_precision: linalg.MatmulPrecision = "auto"

    def __post_init__(self):
        check_options(self, [REDUCTION_DIM, IN_FEATURES, MATMUL_PRECISION])
        super().__post_init__()

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = self._prepare(x, train, "BilinearPooling")
        if self.batch_norm and self.has_variable("params", "bn"):
            expected = math.isqrt(self.variables["params"]["bn"]["scale"].shape[0])
            if x.shape[-1] != expected:
                raise ValueError(
                    f"BilinearPooling has parameters for {expected} input channels but got {x.shape[-1]} "
                    f"(input shape {x.shape}); pass features with {expected} channels or initialise "
                    "the layer for this width."
                )
        gram = linalg.gram(flatten_positions(x), self.matmul_precision)
        v = linalg.l2_normalize(linalg.signed_sqrt(gram.reshape(gram.shape[0], -1)))
        if self.batch_norm:
            # Normalising a float32 vector: keep this BatchNorm in float32.
            v = blocks.batch_norm(train, jnp.float32, name="bn")(v)
        return v


class GaussianEmbedding(_HeadBase):
    """G2DeNet global Gaussian embedding: square root of `[[S + mu mu^T, mu], [mu^T, 1]]`.

    `sqrt_method` "eigh" (as G2DeNet, by eigendecomposition) or "newton_schulz";
    `matmul_precision`: float32 product setting (`GeneralizedGaussianCovariance`).

    Call: `head(x, train=...)` with `[B, H, W, C]` -> `[B, (C+1)(C+2)/2]` float32.
    """

    sqrt_method: SqrtMethod = "eigh"
    num_iters: int = 5
    cov_eps: float = 1e-7
    reduction_dim: int | None = None
    in_features: int | None = None
    lower_triangle: bool = True
    dtype: Dtype = jnp.float32
    matmul_precision: linalg.MatmulPrecision = "auto"

    def __post_init__(self):
        check_options(self, [SQRT_METHOD, NUM_ITERS, COV_EPS, REDUCTION_DIM, IN_FEATURES, MATMUL_PRECISION])
        super().__post_init__()

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = self._prepare(x, train, "GaussianEmbedding")
        m = linalg.gaussian_embedding_matrix(flatten_positions(x), self.cov_eps, self.matmul_precision)
        root = _matrix_root(m, self.sqrt_method, self.num_iters, 1.0, self.matmul_precision)
        return linalg.triu_vector(root, lower=self.lower_triangle)


class GlobalAveragePooling(_HeadBase):
    """Global average pooling (the original ResNet head).

    Call: `head(x, train=...)` with `[B, H, W, C]` -> `[B, C]` float32.
    """

    reduction_dim: int | None = None
    in_features: int | None = None
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        check_options(self, [REDUCTION_DIM, IN_FEATURES])
        super().__post_init__()

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = self._prepare(x, train, "GlobalAveragePooling")
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))
