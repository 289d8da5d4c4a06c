"""2-d convolution whose kernel gradient is one matrix product on CPU.

XLA:CPU computes the kernel gradient of a convolution as another convolution in which
the images of the batch are the contracted "features". With few input channels (ResNet
`layer1`, 64) that convolution is slow: about 21 ms for the kernel gradient of one
`layer1` 3x3 convolution at batch 4, where the forward pass takes about 6 ms. `conv2d`
computes the same gradient as a single GEMM over shifted copies of the input and of the
output gradient (8-10 ms), and leaves the forward pass and the input gradient to XLA:
forward+backward of that convolution 29.4 -> 11.8 ms (PyTorch 9.0;
`python benchmarks/bench_ops.py --threads 2`). On GPU and TPU
(`jax.lax.platform_dependent`) the kernel gradient stays XLA's.
"""
from __future__ import annotations

import functools
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Padding = Tuple[Tuple[int, int], Tuple[int, int]]

#: Stride-1 inputs with at most this many channels take the GEMM kernel gradient on CPU.
#: Measured at batch 4 (kernel gradient alone, one-off timing of both functions): 64
#: channels at 56x56 2.3x faster than XLA; 128 channels at 28x28 and 256 at 14x14 slower,
#: so those stay with XLA, as does the stride-2 7x7 stem (31 vs 30 ms).
MAX_GEMM_GRAD_CHANNELS = 64

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def _conv(x, kernel, stride: int, padding: Padding):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding, dimension_numbers=_DIMENSION_NUMBERS)


def kernel_grad_gemm(x, g, kernel_size: int, stride: int, padding: Padding):
    """Gradient of `sum(conv(x, k) * g)` with respect to the HWIO kernel `k`, as one GEMM.

    `dk[i, j, c, o] = sum_{b,h,w} x_pad[b, s*h + i, s*w + j, c] * g[b, h, w, o]`.
    With stride s the padded input is first rearranged space-to-depth (s x s blocks
    into channels), which turns the kernel into a stride-1 kernel of q = ceil(k/s) taps.
    On the row-major flattening of that grid, tap (i, j) reads the input `i * W2 + j`
    rows further than the output position, so with
      X = [x_flat shifted by j rows, for j < q]           # [S, q * s*s*C]
      G = [g_flat shifted back by i * W2 rows, for i < q]  # [S, q * O]
    `X^T G` holds every tap (i, j) at once (q^2 s^2 C O sums of S terms). The output
    gradient is placed on the same grid with zeros outside the image, so no sum crosses
    a row or an image.

    Args:
      x: `[B, H, W, C]` input of the convolution.
      g: `[B, Ho, Wo, O]` gradient of its output.
      kernel_size, stride, padding: of the convolution (square kernel, PyTorch-style
        explicit padding `((top, bottom), (left, right))`).

    Returns:
      `[k, k, C, O]` kernel gradient in `x`'s dtype (accumulated in at least float32).
    """
    b, h, w, c = x.shape
    _, ho, wo, o = g.shape
    k, s = kernel_size, stride
    q = -(-k // s)
    h2, w2 = ho + q - 1, wo + q - 1  # grid (in s x s blocks) that every tap reads from
    (top, _), (left, _) = padding
    # lax.pad crops where the high padding is negative (rows no output reads).
    zero = jnp.zeros((), x.dtype)
    xp = jax.lax.pad(x, zero, ((0, 0, 0), (top, s * h2 - h - top, 0), (left, s * w2 - w - left, 0), (0, 0, 0)))
    if s > 1:
        xp = xp.reshape(b, h2, s, w2, s, c).transpose(0, 1, 3, 2, 4, 5)
    c2 = s * s * c
    rows = b * h2 * w2
    span = rows + (q - 1) * w2  # rows of X and G: every shifted product term lands in here
    xf = xp.reshape(rows, c2)
    gf = jnp.pad(g, ((0, 0), (0, h2 - ho), (0, w2 - wo), (0, 0))).reshape(rows, o)
    # Contract over the minor axis of both operands (transposed copies): XLA:CPU's GEMM
    # is faster in that form than contracting the long leading axis.
    contract_minor = (((1,), (1,)), ((), ()))
    acc = jnp.promote_types(x.dtype, jnp.float32)  # bf16 accumulates in float32; float64 stays
    if q * q * c2 + o <= q * (c2 + o):
        # Few input channels (the stem): shift only the input, all q^2 taps.
        xf = jnp.pad(xf, ((0, (q - 1) * (w2 + 1)), (0, 0)))
        x_taps = jnp.concatenate([xf[i * w2 + j : i * w2 + j + rows] for i in range(q) for j in range(q)], axis=1)
        full = jax.lax.dot_general(x_taps.T, gf.T, contract_minor, preferred_element_type=acc)
        full = full.reshape(q, q, s, s, c, o).transpose(0, 2, 1, 3, 4, 5)  # (i, dy, j, dx, c, o)
    else:
        span = rows + (q - 1) * w2  # rows of X and G: every shifted product term lands in here
        xf = jnp.pad(xf, ((0, span + q - 1 - rows), (0, 0)))
        gf = jnp.pad(gf, (((q - 1) * w2, span - rows), (0, 0)))  # gf[r] now at row r + (q-1) W2
        x_taps = jnp.concatenate([xf[j : j + span] for j in range(q)], axis=1)
        g_taps = jnp.concatenate([gf[(q - 1 - i) * w2 : (q - 1 - i) * w2 + span] for i in range(q)], axis=1)
        full = jax.lax.dot_general(x_taps.T, g_taps.T, contract_minor, preferred_element_type=acc)
        full = full.reshape(q, s, s, c, q, o).transpose(4, 1, 0, 2, 3, 5)  # (j,dy,dx,c,i,o) -> (i,dy,j,dx,c,o)
    full = full.reshape(q * s, q * s, c, o)
    return full[:k, :k].astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x, kernel, stride: int, padding: Padding):
    """`lax.conv_general_dilated` on NHWC `x` and an HWIO square `kernel`, no dilation.

    Forward pass and input gradient are XLA's. The kernel gradient is
    `kernel_grad_gemm` on CPU for stride 1 when `x` has at most `MAX_GEMM_GRAD_CHANNELS`
    channels, XLA's otherwise; the two agree to float32 rounding (tested).
    """
    return _conv(x, kernel, stride, padding)


def _conv2d_fwd(x, kernel, stride, padding):
    return _conv(x, kernel, stride, padding), (x, kernel)


def _conv2d_bwd(stride, padding, residuals, g):
    x, kernel = residuals
    dx = jax.vjp(lambda x_: _conv(x_, kernel, stride, padding), x)[1](g)[0]

    def xla_grad(x, g):
        return jax.vjp(lambda k_: _conv(x, k_, stride, padding), kernel)[1](g)[0]

    if stride != 1 or x.shape[-1] > MAX_GEMM_GRAD_CHANNELS or kernel.shape[0] != kernel.shape[1]:
        return dx, xla_grad(x, g)

    def gemm_grad(x, g):
        return kernel_grad_gemm(x, g, kernel.shape[0], stride, padding).astype(kernel.dtype)

    return dx, jax.lax.platform_dependent(x, g, cpu=gemm_grad, default=xla_grad)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


class Conv(nn.Module):
    """Bias-free square convolution with explicit padding, computed by `conv2d`.

    Same parameter as `nn.Conv(features, (k, k), strides=(s, s), padding=padding,
    use_bias=False)`: `kernel` of shape `[k, k, in, features]`, initialised identically,
    and the same forward result.
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: Padding = ((0, 0), (0, 0))
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features), self.param_dtype)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        return conv2d(x, kernel, self.stride, tuple(tuple(p) for p in self.padding))
