"""Flax linen pooling heads: the 3G layer and the global pooling baselines of the paper.

All heads take NHWC feature maps `[B, H, W, C]` and are called as
`head(x, train=...)`. `train=True` uses batch statistics in BatchNorm and updates the
running averages (pass `mutable=['batch_stats']` to `apply`). Convolutions and
BatchNorm run in `dtype` (e.g. bf16, parameters stay float32); the covariance,
square root and vectorisation always run in float32 at HIGHEST precision
(`gg_jax.linalg`), and every head returns float32.

BatchNorm follows the reference (PyTorch defaults): epsilon 1e-5, running averages
`0.9 * running + 0.1 * batch` (Flax `momentum=0.9`). Flax updates the running
variance with the *biased* batch variance, PyTorch with the unbiased one; eval-mode
outputs are unaffected (see the README).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from gg_jax import linalg, mggd

Dtype = Any

#: Kernel init of the reference: He-normal with fan-out (PyTorch kaiming_normal_ mode='fan_out').
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def batch_norm(train: bool, dtype: Dtype, name: str | None = None, scale_init=nn.initializers.ones):
    """BatchNorm with the reference's (PyTorch's) epsilon and momentum."""
    return nn.BatchNorm(
        use_running_average=not train,
        # Two-pass variance mean((x - mean)^2): E[x^2] - E[x]^2 loses digits to cancellation.
        use_fast_variance=False,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_init=scale_init,
        name=name,
    )


def conv1x1_matmul(x, kernel, stride: int = 1):
    """A bias-free 1x1 convolution as one matmul over all positions (the CPU form).

    x: `[B, H, W, C]` (or any `[..., C]` when `stride == 1`); kernel: `[1, 1, C, O]`, both of
    one dtype. Returns `[B, ceil(H/stride), ceil(W/stride), O]` (`[..., O]`): PyTorch's 1x1
    convolution with padding 0, which reads exactly the pixels `x[:, ::stride, ::stride]`.
    """
    if stride != 1:
        x = x[:, ::stride, ::stride, :]
    # Flattened to [positions, C]: with one contracting dimension the kernel gradient
    # (x^T dy) needs no transposed copy of dy on XLA:CPU.
    y = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), kernel[0, 0], (((1,), (0,)), ((), ())))
    return y.reshape(x.shape[:-1] + (kernel.shape[-1],))


def conv1x1_xla(x, kernel, stride: int = 1):
    """The same 1x1 convolution as `conv1x1_matmul`, as an XLA convolution (GPU and TPU form).

    x: `[B, H, W, C]`; kernel: `[1, 1, C, O]`. Returns `[B, ceil(H/stride), ceil(W/stride), O]`.
    """
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def conv1x1_by_platform(x, kernel, stride: int = 1):
    """`conv1x1_matmul` on CPU, `conv1x1_xla` on GPU and TPU (`jax.lax.platform_dependent`).

    XLA:CPU runs the convolution and its kernel gradient far slower than the matmul
    (dramatically so inside the `nn.scan` of `UnrolledReweighting`). XLA:GPU (jax 0.11.2)
    fails to compile the matmul form of a strided 1x1 convolution in a train step: its Triton
    GEMM fusion aborts on the strided slice before the reshape ("triton_tiling_propagation.cc
    Check failed: subdim_size_accumulator == dim_size (784 vs. 56)"); as a convolution it
    goes to cuDNN. TPUs take the convolution too, the form XLA:TPU is built around.
    """
    if x.ndim != 4:
        return conv1x1_matmul(x, kernel, stride)
    return jax.lax.platform_dependent(
        x,
        kernel,
        cpu=functools.partial(conv1x1_matmul, stride=stride),
        default=functools.partial(conv1x1_xla, stride=stride),
    )


class Conv1x1(nn.Module):
    """Bias-free 1x1 convolution with an optional stride (`conv1x1_by_platform`: a matmul on CPU).

    Same parameter as `nn.Conv(features, (1, 1), strides=stride, use_bias=False)` with
    PyTorch's padding 0: `kernel` of shape `[1, 1, in, features]`, initialised identically
    (checkpoints and converters see no difference), and the same result.
    """

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = conv_kernel_init
    stride: int = 1

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features), self.param_dtype)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        return conv1x1_by_platform(x, kernel, self.stride)


def conv1x1(features: int, dtype: Dtype, name: str | None = None):
    """Bias-free 1x1 convolution with the reference's He-normal fan-out init (`Conv1x1`)."""
    return Conv1x1(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=conv_kernel_init, name=name)


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


class ChannelReduction(nn.Module):
    """1x1 conv -> BN -> ReLU to `features` channels (reference head step 1)."""

    features: int = 256
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        check_param_channels(self, x, "layer_reduce", "ChannelReduction")
        x = conv1x1(self.features, self.dtype, name="layer_reduce")(x)
        x = batch_norm(train, self.dtype, name="layer_reduce_bn")(x)
        return nn.relu(x)


ReweightingVariant = Literal["3g", "urm_v1", "urm_v2"]
#: `GeneralizedGaussianCovariance.reweighting`: a learned block variant, or "exact" (`ExactReweighting`).
HeadReweighting = Literal["3g", "urm_v1", "urm_v2", "exact"]


class ReweightingBlock(nn.Module):
    """One re-weighted block of the unrolling re-weighting module (paper Fig. 3, Eqns. 12-13).

    Approximates the generalized-Gaussian weights of Eqn. (9) with 1x1 convolutions,
    exactly as the reference block (`AtMp{t}`; submodule names are the checkpoint's):

        a = BN(map1(Xh)) * BN(map2(Xh))
        z = ReLU(a + BN(map21(X)))                 # map21 reads X, not Xh
        b = ReLU(BN(map3(z))) * ReLU(BN(map4(z)))
        s = atmap2(ReLU(BN(atmap1(b))))            # C -> hidden (BN) -> 1, no BN
        w = sigmoid(s + atmap3(s))                 # atmap3: 1 -> 1, the c * L^(1-beta) term
        return Xh * w                              # one weight per position

    `variant` selects the ablations of Sec. 4.2 / Fig. 5: "urm_v1" computes
    `w = sigmoid(atmap2(ReLU(BN(atmap1(Xh)))))` (a plain spatial-attention map),
    "urm_v2" first forms `a = BN(map1(Xh)) * BN(map2(Xh))` and then `w` from `a` the same
    way. Both ignore X.

    Call: `block(x_hat, x, train=...)` with NHWC `x_hat` (running features) and `x`
    (the block input X of the module; defaults to `x_hat`). Returns `x_hat * w` in `dtype`.
    """

    hidden: int = 64
    variant: ReweightingVariant = "3g"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_hat, x=None, *, train: bool):
        check_feature_map(x_hat, "ReweightingBlock")
        check_param_channels(self, x_hat, "atmap1", "ReweightingBlock")  # atmap1: C -> hidden in every variant
        x = x_hat if x is None else x
        c = x_hat.shape[-1]
        conv = functools.partial(conv1x1, dtype=self.dtype)
        bn = functools.partial(batch_norm, train, self.dtype)
        if self.variant == "3g":
            a = bn(name="bn1")(conv(c, name="map1")(x_hat)) * bn(name="bn2")(conv(c, name="map2")(x_hat))
            z = nn.relu(a + bn(name="bn21")(conv(c, name="map21")(x)))
            feat = nn.relu(bn(name="bn3")(conv(c, name="map3")(z))) * nn.relu(bn(name="bn4")(conv(c, name="map4")(z)))
        elif self.variant == "urm_v2":
            feat = bn(name="bn1")(conv(c, name="map1")(x_hat)) * bn(name="bn2")(conv(c, name="map2")(x_hat))
        elif self.variant == "urm_v1":
            feat = x_hat
        else:
            raise ValueError(f"Unknown re-weighting variant {self.variant!r}; choose '3g', 'urm_v1' or 'urm_v2'.")
        s = conv(1, name="atmap2")(nn.relu(bn(name="bnat1")(conv(self.hidden, name="atmap1")(feat))))
        if self.variant == "3g":
            s = s + conv(1, name="atmap3")(s)
        w = nn.sigmoid(s)
        return x_hat * w.astype(x_hat.dtype)


class _ScannedReweightingBlock(nn.Module):
    """`ReweightingBlock` as a scan body: carry `Xh`, broadcast `X`, emit each output."""

    hidden: int
    variant: ReweightingVariant
    train: bool
    dtype: Dtype

    @nn.compact
    def __call__(self, x_hat, x):
        out = ReweightingBlock(self.hidden, self.variant, self.dtype, name="block")(x_hat, x, train=self.train)
        return out, out


class UnrolledReweighting(nn.Module):
    """Unrolling re-weighting module: `num_blocks` re-weighted blocks with separate weights.

    Block t maps `Xh_{t-1} -> Xh_t` (with `Xh_0 = X`) and always also reads `X`
    (paper Sec. 3.2.2, Fig. 2). Built with `nn.scan`: the blocks' parameters and batch
    statistics are stacked on a leading axis of length `num_blocks`
    (e.g. `blocks/block/map1/kernel` has shape `[T, 1, 1, C, C]`). The per-block outputs
    `[T, B, H, W, C]` are sown as `intermediates/reweighted`.

    Call: `module(x, train=...)` -> `[B, H, W, C]` in `dtype`. `num_blocks=0` is the identity.

    `unroll=True` (default) unrolls the scan in the compiled program (the parameters stay
    stacked): on XLA:CPU the rolled loop's dynamic slicing of stacked parameters and
    residuals made the module about 1.7x slower. `unroll=False` keeps a compact loop.
    """

    num_blocks: int = 3
    hidden: int = 64
    variant: ReweightingVariant = "3g"
    dtype: Dtype = jnp.float32
    unroll: bool = True

    @nn.compact
    def __call__(self, x, *, train: bool):
        check_feature_map(x, "UnrolledReweighting")
        if self.num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {self.num_blocks}.")
        if self.num_blocks == 0:
            return x
        x = x.astype(self.dtype)
        blocks = nn.scan(
            _ScannedReweightingBlock,
            variable_axes={"params": 0, "batch_stats": 0},
            split_rngs={"params": True},
            in_axes=nn.broadcast,
            length=self.num_blocks,
            unroll=self.num_blocks if self.unroll else 1,
        )(self.hidden, self.variant, train, self.dtype, name="blocks")
        out, per_block = blocks(x, x)
        self.sow("intermediates", "reweighted", per_block)
        return out


class ExactReweighting(nn.Module):
    """The T re-weighting steps of paper Eqn. (9) computed exactly, not learned (`mggd.reweighted_covariance`).

    Each step forms `Y = X^T Sigma^{-1} X` with `Sigma^{-1/2}` from Newton-Schulz (Eqn. 10),
    weights `w = N d / (diag(Y) + c diag(Y)^{1-beta})` (rescaled to mean 1) and the weighted
    covariance `Sigma_t = 1/N sum_n w_n xc_n xc_n^T + eps I` of the centred positions; the result
    is `Sigma_T`, the covariance that the head then takes the root of. No BatchNorm, no 1x1 convs.

    Attributes:
      num_steps: T; 0 returns the plain covariance (`linalg.covariance`).
      beta: the MGGD shape, fixed (> 0); None learns it as the parameter `log_beta`
        (beta = exp(log_beta), initialised at 1: the plain covariance when `c` is None).
      c: None for Eqn. (7)'s per-position `c_n = sum_{j != n} y_j^beta` (each step is
        the exact fixed-point step of Eqn. (3)); a constant `c >= 0` shared by all positions
        (Eqn. (9) as the learned block approximates it).
      learn_c: learn the constant c as the parameter `log_c` (c = exp(log_c) > 0), initialised at
        `c` (which must then be > 0).
      num_iters: Newton-Schulz iterations of each inverse root.
      eps: ridge of every `Sigma_t`.
      unroll: unroll the scan over the T steps.

    Call: `module(x)` with NHWC `x` `[B, H, W, C]` -> `Sigma_T` `[B, C, C]` float32. Intermediates:
    `weights` `[T, B, H, W]` and `reweighted` `[T, B, H, W, C]` (`sqrt(w_t)` times the centred map,
    whose second moment is `Sigma_t - eps I`).
    """

    num_steps: int = 3
    beta: float | None = None
    c: float | None = None
    learn_c: bool = False
    num_iters: int = 5
    eps: float = 1e-7
    unroll: bool = True

    @nn.compact
    def __call__(self, x):
        check_feature_map(x, "ExactReweighting")
        if self.beta is not None and not self.beta > 0:
            raise ValueError(f"ExactReweighting: beta must be > 0 (or None to learn it), got {self.beta}.")
        if self.c is not None and not self.c >= 0:
            raise ValueError(f"ExactReweighting: c must be >= 0 (or None for Eqn. (7)'s c_n), got {self.c}.")
        if self.learn_c and not (self.c is not None and self.c > 0):
            raise ValueError(f"ExactReweighting: learn_c=True needs the initial c > 0, got c={self.c}.")
        if self.num_iters < 1:
            raise ValueError(f"ExactReweighting: num_iters must be >= 1, got {self.num_iters}.")
        if self.beta is None:
            beta = jnp.exp(self.param("log_beta", nn.initializers.zeros, (), jnp.float32))
        else:
            beta = self.beta
        if self.learn_c:
            c = jnp.exp(self.param("log_c", nn.initializers.constant(math.log(self.c)), (), jnp.float32))
        else:
            c = self.c
        b, h, w, ch = x.shape
        features = flatten_positions(x)
        features = features.astype(linalg.compute_dtype(features.dtype))
        sigma, weights = mggd.reweighted_covariance(
            features,
            num_steps=self.num_steps,
            beta=beta,
            c=c,
            num_iters=self.num_iters,
            eps=self.eps,
            unroll=self.unroll,
        )
        centred = features - jnp.mean(features, axis=1, keepdims=True)
        self.sow("intermediates", "weights", weights.reshape((-1, b, h, w)))
        self.sow("intermediates", "reweighted", (jnp.sqrt(weights)[..., None] * centred).reshape((-1, b, h, w, ch)))
        return sigma


SqrtMethod = Literal["newton_schulz", "eigh"]


def _matrix_root(s, method: SqrtMethod, num_iters: int, lam: float = 1.0):
    if lam != 1.0:
        return linalg.regularized_sqrtm(s, lam, method=method, num_iters=num_iters)
    if method == "newton_schulz":
        return linalg.sqrtm_newton_schulz(s, num_iters)
    if method == "eigh":
        return linalg.sqrtm_eigh(s, 0.5)
    raise ValueError(f"Unknown square-root method {method!r}; choose 'newton_schulz' or 'eigh'.")


class _HeadBase(nn.Module):
    """Shared options: optional channel reduction and an input check."""

    def _prepare(self, x, train: bool, layer: str):
        check_feature_map(x, layer, getattr(self, "in_features", None))
        if getattr(self, "reduction_dim", None):
            x = ChannelReduction(self.reduction_dim, self.dtype, name="reduce")(x.astype(self.dtype), train=train)
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

    Call: `head(x, train=...)` with NHWC `x` `[B, H, W, C]` -> `[B, C(C+1)/2]` float32.
    Intermediates (`apply(..., mutable=['intermediates'])`): `reduced` (with `reduction_dim`),
    `reweighting/reweighted` (and `reweighting/weights` for "exact"), `covariance`, `sqrt`.
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

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = self._prepare(x, train, "GeneralizedGaussianCovariance")
        if self.reweighting == "exact":
            check_feature_map(x, "GeneralizedGaussianCovariance")
            if self.num_blocks < 0:
                raise ValueError(f"num_blocks must be >= 0, got {self.num_blocks}.")
            s = ExactReweighting(
                self.num_blocks,
                beta=self.exact_beta,
                c=self.exact_c,
                learn_c=self.exact_learn_c,
                num_iters=self.num_iters if self.exact_num_iters is None else self.exact_num_iters,
                eps=self.cov_eps,
                name="reweighting",
            )(x)
        else:
            x = UnrolledReweighting(self.num_blocks, self.hidden, self.reweighting, self.dtype, name="reweighting")(
                x, train=train
            )
            s = linalg.covariance(flatten_positions(x), self.cov_eps)
        self.sow("intermediates", "covariance", s)
        if self.estimator:
            s = _matrix_root(s, self.sqrt_method, self.num_iters, self.lam)
            self.sow("intermediates", "sqrt", s)
        return linalg.triu_vector(s, lower=self.lower_triangle)


class CovariancePooling(_HeadBase):
    """Global covariance pooling baselines (paper Table 2).

    method:
      "isqrt": iSQRT-COV, square root by `num_iters` Newton-Schulz iterations;
      "mpncov": MPN-COV, matrix power `power` (0.5) by eigendecomposition;
      "plain": the covariance itself ("Plain COV").

    Call: `head(x, train=...)` with `[B, H, W, C]` -> `[B, C(C+1)/2]` float32.
    """

    method: Literal["isqrt", "mpncov", "plain"] = "isqrt"
    num_iters: int = 5
    power: float = 0.5
    cov_eps: float = 1e-7
    reduction_dim: int | None = None
    in_features: int | None = None
    lower_triangle: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = self._prepare(x, train, "CovariancePooling")
        s = linalg.covariance(flatten_positions(x), self.cov_eps)
        self.sow("intermediates", "covariance", s)
        if self.method == "isqrt":
            s = linalg.sqrtm_newton_schulz(s, self.num_iters)
        elif self.method == "mpncov":
            s = linalg.sqrtm_eigh(s, self.power)
        elif self.method != "plain":
            raise ValueError(f"Unknown covariance pooling method {self.method!r}; choose 'isqrt', 'mpncov' or 'plain'.")
        return linalg.triu_vector(s, lower=self.lower_triangle)


class BilinearPooling(_HeadBase):
    """B-CNN pooling (Lin et al.): `X^T X / N`, signed square root, l2 normalisation.

    The full `C x C` matrix is flattened, as in B-CNN. The paper's B-CNN baseline adds a
    BatchNorm after the normalisation (`batch_norm=True`; its scale starts at 1).

    Call: `head(x, train=...)` with `[B, H, W, C]` -> `[B, C*C]` float32.
    """

    batch_norm: bool = True
    reduction_dim: int | None = None
    in_features: int | None = None
    dtype: Dtype = jnp.float32

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
        f = linalg._as_f32(flatten_positions(x))
        n = f.shape[1]
        gram = jnp.einsum("bnc,bnd->bcd", f, f, precision=linalg.HIGHEST) / n
        v = linalg.l2_normalize(linalg.signed_sqrt(gram.reshape(gram.shape[0], -1)))
        if self.batch_norm:
            # Normalising a float32 vector: keep this BatchNorm in float32.
            v = batch_norm(train, jnp.float32, name="bn")(v)
        return v


class GaussianEmbedding(_HeadBase):
    """G2DeNet global Gaussian embedding: square root of `[[S + mu mu^T, mu], [mu^T, 1]]`.

    `sqrt_method` "eigh" (as G2DeNet, by eigendecomposition) or "newton_schulz".

    Call: `head(x, train=...)` with `[B, H, W, C]` -> `[B, (C+1)(C+2)/2]` float32.
    """

    sqrt_method: SqrtMethod = "eigh"
    num_iters: int = 5
    cov_eps: float = 1e-7
    reduction_dim: int | None = None
    in_features: int | None = None
    lower_triangle: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = self._prepare(x, train, "GaussianEmbedding")
        m = linalg.gaussian_embedding_matrix(flatten_positions(x), self.cov_eps)
        return linalg.triu_vector(_matrix_root(m, self.sqrt_method, self.num_iters), lower=self.lower_triangle)


class GlobalAveragePooling(_HeadBase):
    """Global average pooling (the original ResNet head).

    Call: `head(x, train=...)` with `[B, H, W, C]` -> `[B, C]` float32.
    """

    reduction_dim: int | None = None
    in_features: int | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = self._prepare(x, train, "GlobalAveragePooling")
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))
