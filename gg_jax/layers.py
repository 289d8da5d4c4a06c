"""Flax linen pooling heads: the 3G layer and the global pooling baselines of the paper.

All heads take NHWC feature maps `[B, H, W, C]` and are called as
`head(x, train=...)`. `train=True` uses batch statistics in BatchNorm and updates the
running averages (pass `mutable=['batch_stats']` to `apply`). Convolutions and
BatchNorm run in `dtype` (e.g. bf16, parameters stay float32); the covariance,
square root and vectorisation always run in float32 (`gg_jax.linalg`), their products
at the head's `matmul_precision` ("auto": the fastest float32-accurate setting of the
platform, `linalg.default_matmul_precision`), and every head returns float32.

BatchNorm follows the reference (PyTorch defaults): epsilon 1e-5, running averages
`0.9 * running + 0.1 * batch` (Flax `momentum=0.9`). Flax updates the running
variance with the *biased* batch variance, PyTorch with the unbiased one; eval-mode
outputs are unaffected (see docs/checkpoints.md).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, Literal

import flax.linen as nn
import jax.numpy as jnp

from gg_jax import linalg, mggd
from gg_jax.backbones import blocks

Dtype = Any
ModuleDef = Any


class _Conv1x1Kernel(nn.Module):
    """The `kernel` `[1, 1, in, features]` of a 1x1 convolution, created but not applied.

    Same path, name, shape, dtype and initialisation (the reference's; Flax draws it from the
    module path) as the convolution module's own, so variables and checkpoints are unchanged.
    """

    features: int

    @nn.compact
    def __call__(self, in_features: int):
        return self.param("kernel", blocks.conv_kernel_init, (1, 1, in_features, self.features), jnp.float32)


class _ConvModule(nn.Module):
    """Base of the modules with 1x1 convolutions: `conv` is the convolution module.

    The default is `nn.Conv` without bias and with the reference's init
    (`gg_jax.backbones.blocks.Conv`); `gg_jax.models.create` passes the same module it gives
    the backbone. Keyword-only, so that the heads' positional fields are unchanged.
    """

    conv: ModuleDef = dataclasses.field(default=blocks.Conv, kw_only=True)

    def conv1x1(self, features: int, dtype: Dtype, name: str):
        return self.conv(features, (1, 1), padding="VALID", dtype=dtype, name=name)

    def conv1x1_parallel(self, x, features: int, dtype: Dtype, names):
        """The 1x1 convolutions `names` of one input `x` `[B, H, W, C]`, computed as one.

        Each keeps its own `kernel` parameter (`conv1x1`'s, reference init); they are
        concatenated along the output axis at compute time and applied by one `conv`: one
        read of `x` and one wider product instead of len(names). Returns a list of
        `[B, H, W, features]` in `dtype`, in the order of `names`.
        """
        kernels = [_Conv1x1Kernel(features, name=name)(x.shape[-1]) for name in names]
        conv = self.conv(features * len(names), (1, 1), padding="VALID", dtype=dtype, parent=None)
        y = conv.apply({"params": {"kernel": jnp.concatenate(kernels, axis=-1)}}, x)
        return jnp.split(y, len(names), axis=-1)


def check_feature_map(x, layer: str, in_features: int | None = None):
    """Raise a ValueError unless `x` is an NHWC map `[B, H, W, C]` (with C == in_features)."""
    if x.ndim != 4:
        raise ValueError(
            f"{layer} expects an NHWC feature map of shape [batch, height, width, channels], "
            f"got an array of rank {x.ndim} with shape {x.shape}. Transpose NCHW inputs "
            "with x.transpose(0, 2, 3, 1)."
        )
    if in_features is not None and x.shape[-1] != in_features:
        raise ValueError(
            f"{layer} was configured for {in_features} input channels but got {x.shape[-1]} "
            f"(input shape {x.shape}); set in_features={x.shape[-1]} or add a channel reduction "
            "(reduction_dim=...)."
        )


def check_param_channels(module: nn.Module, x, param: str, layer: str):
    """Raise a ValueError if `x` has not the channel count of `module`'s existing `param`.

    `param` names a child holding a `kernel` `[..., in, out]` (a 1x1 conv). Without this,
    applying initialised variables to the wrong width fails deep inside Flax with a
    parameter-shape error; here the message says what was expected.
    """
    if module.has_variable("params", param):
        expected = module.variables["params"][param]["kernel"].shape[-2]
        if x.shape[-1] != expected:
            raise ValueError(
                f"{layer} has parameters for {expected} input channels but got {x.shape[-1]} "
                f"(input shape {x.shape}); pass features with {expected} channels or initialise "
                "the layer for this width."
            )


def flatten_positions(x):
    """`[B, H, W, C] -> [B, H*W, C]`."""
    b, h, w, c = x.shape
    return x.reshape(b, h * w, c)


def _is_int(value, low: int) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_options(module: nn.Module, rules) -> None:
    """ValueError naming the module and every option out of its range: `rules` holds
    `(option, ok, what it must be)` checked on the module's value of the option."""
    problems = [
        f"{name}={getattr(module, name)!r} must be {what}" for name, ok, what in rules if not ok(getattr(module, name))
    ]
    if problems:
        raise ValueError(f"{type(module).__name__}: {'; '.join(problems)}.")


def _matmul_precision_ok(value) -> bool:
    try:
        linalg.lax_precision(value, platform="cpu")
    except ValueError:
        return False
    return True


# Rules shared by the heads (`check_options`).
_NUM_ITERS = ("num_iters", lambda v: _is_int(v, 1), "an integer >= 1 (Newton-Schulz iterations)")
_COV_EPS = ("cov_eps", lambda v: _is_number(v) and v >= 0, "a number >= 0 (the covariance's ridge)")
_REDUCTION_DIM = (
    "reduction_dim",
    lambda v: v is None or _is_int(v, 0),
    "None or an integer >= 0 (channels of the 1x1 reduction; 0: none)",
)
_IN_FEATURES = ("in_features", lambda v: v is None or _is_int(v, 1), "None or an integer >= 1")
_SQRT_METHOD = ("sqrt_method", lambda v: v in ("newton_schulz", "eigh"), "'newton_schulz' or 'eigh'")
_MATMUL_PRECISION = (
    "matmul_precision",
    _matmul_precision_ok,
    "'auto', 'highest', 'bf16_6x' or 'tf32_3x' (the covariance's float32 products)",
)


class ChannelReduction(_ConvModule):
    """1x1 conv -> BN -> ReLU to `features` channels (reference head step 1)."""

    features: int = 256
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        check_options(self, [("features", lambda v: _is_int(v, 1), "an integer >= 1")])
        super().__post_init__()

    @nn.compact
    def __call__(self, x, *, train: bool):
        check_param_channels(self, x, "layer_reduce", "ChannelReduction")
        x = self.conv1x1(self.features, self.dtype, name="layer_reduce")(x)
        x = blocks.batch_norm(train, self.dtype, name="layer_reduce_bn")(x)
        return nn.relu(x)


ReweightingVariant = Literal["3g", "urm_v1", "urm_v2"]
_NUM_BLOCKS = ("num_blocks", lambda v: _is_int(v, 0), "an integer >= 0 (re-weighting blocks T)")
_HIDDEN = ("hidden", lambda v: _is_int(v, 1), "an integer >= 1 (channels inside a re-weighting block)")
_BLOCK_REWEIGHTING = ("reweighting", lambda v: v in ("3g", "urm_v1", "urm_v2"), "'3g', 'urm_v1' or 'urm_v2'")


def _check_learn_c(module) -> None:
    if module.exact_learn_c and not (module.exact_c is not None and module.exact_c > 0):
        raise ValueError(
            f"{type(module).__name__}: exact_learn_c=True needs the initial exact_c > 0, "
            f"got exact_c={module.exact_c!r}."
        )


_EXACT_RULES = (
    ("exact_beta", lambda v: v is None or (_is_number(v) and v > 0), "None (learned) or a number > 0"),
    ("exact_c", lambda v: v is None or (_is_number(v) and v >= 0), "None (Eqn. (7)'s c_n) or a number >= 0"),
    ("exact_num_iters", lambda v: v is None or _is_int(v, 1), "an integer >= 1 (Newton-Schulz iterations)"),
)
#: `GeneralizedGaussianCovariance.reweighting`: a learned block variant, or "exact" (`ExactReweighting`).
HeadReweighting = Literal["3g", "urm_v1", "urm_v2", "exact"]


class ReweightingBlock(_ConvModule):
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
        check_options(self, [_HIDDEN, _BLOCK_REWEIGHTING])
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


class _ScannedReweightingBlock(_ConvModule):
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


class UnrolledReweighting(_ConvModule):
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
        check_options(self, [_NUM_BLOCKS, _HIDDEN, _BLOCK_REWEIGHTING])
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
        check_options(self, [_NUM_BLOCKS, *_EXACT_RULES, _COV_EPS, _MATMUL_PRECISION])
        _check_learn_c(self)
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


class _HeadBase(_ConvModule):
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
                _NUM_BLOCKS,
                _NUM_ITERS,
                ("lam", lambda v: _is_number(v) and 0 < v <= 1, "in (0, 1] (Theorem 1's lambda; 1: plain root)"),
                (
                    "reweighting",
                    lambda v: v in ("3g", "urm_v1", "urm_v2", "exact"),
                    "'3g', 'urm_v1', 'urm_v2' or 'exact'",
                ),
                _HIDDEN,
                _SQRT_METHOD,
                _COV_EPS,
                _REDUCTION_DIM,
                _IN_FEATURES,
                *_EXACT_RULES,
                _MATMUL_PRECISION,
            ],
        )
        exact = [f for f in ("exact_beta", "exact_c", "exact_num_iters") if getattr(self, f) is not None]
        if self.reweighting != "exact" and (exact or self.exact_learn_c):
            raise ValueError(
                f"GeneralizedGaussianCovariance: {', '.join(exact or ['exact_learn_c'])} only applies with "
                f"reweighting='exact', not {self.reweighting!r}."
            )
        _check_learn_c(self)
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
                _NUM_ITERS,
                ("power", lambda v: _is_number(v) and v > 0, "a number > 0 (MPN-COV's matrix power)"),
                _COV_EPS,
                _REDUCTION_DIM,
                _IN_FEATURES,
                _MATMUL_PRECISION,
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
        check_options(self, [_REDUCTION_DIM, _IN_FEATURES, _MATMUL_PRECISION])
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
        check_options(self, [_SQRT_METHOD, _NUM_ITERS, _COV_EPS, _REDUCTION_DIM, _IN_FEATURES, _MATMUL_PRECISION])
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
        check_options(self, [_REDUCTION_DIM, _IN_FEATURES])
        super().__post_init__()

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = self._prepare(x, train, "GlobalAveragePooling")
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))
