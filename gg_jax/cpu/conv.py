"""Convolutions for XLA:CPU: 1x1 convolutions as matmuls, kernel gradients as GEMMs.

`Conv` takes the call and the parameter of `nn.Conv(..., use_bias=False)` (`kernel`
`[kh, kw, in, out]`, same init, same result to float32 rounding), so `gg_jax.models.create`
substitutes it on CPU without changing checkpoints. XLA:CPU runs a 1x1 convolution and some
kernel-gradient convolutions slower than the equivalent matrix products; the thresholds
below pick, per input shape, the form that is faster there.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gg_jax.backbones import blocks

Dtype = Any
Padding = tuple[tuple[int, int], tuple[int, int]]

#: Stride-1 inputs with at most this many channels take the GEMM kernel gradient.
MAX_GEMM_GRAD_CHANNELS = 64
#: Stride-1 inputs with more channels take the im2col kernel gradient when they have at least
#: this many channels or the output at least this many positions (batch x height x width).
MIN_IM2COL_GRAD_CHANNELS = 512
MIN_IM2COL_GRAD_POSITIONS = 6272
#: Inputs with at most this many channels (RGB), any stride, take the per-image "planar" GEMM.
MAX_PLANAR_CHANNELS = 4

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def conv1x1_matmul(x, kernel, stride: int = 1):
    """A bias-free 1x1 convolution as one matmul over all positions.

    x: `[B, H, W, C]` (or any `[..., C]` when `stride == 1`); kernel: `[1, 1, C, O]`, both of
    one dtype. Returns `[B, ceil(H/stride), ceil(W/stride), O]` (`[..., O]`): PyTorch's 1x1
    convolution with padding 0, which reads exactly the pixels `x[:, ::stride, ::stride]`.
    """
    if stride != 1:
        x = x[:, ::stride, ::stride, :]
    # Flattened to [positions, C]: one contracting dimension, so the kernel gradient x^T dy
    # needs no transposed copy of dy.
    y = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), kernel[0, 0], (((1,), (0,)), ((), ())))
    return y.reshape(x.shape[:-1] + (kernel.shape[-1],))


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

    With at most `MAX_PLANAR_CHANNELS` input channels (RGB) that layout wastes the GEMM
    on a tiny inner dimension; instead each image's k*k*C taps become rows read from the
    space-to-depth phase planes (`[k*k*C, Ho*Wo]`), one GEMM per image against its
    `[Ho*Wo, O]` output gradient, summed over the batch.

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
    acc = jnp.promote_types(x.dtype, jnp.float32)  # bf16 accumulates in float32; float64 stays
    if c <= MAX_PLANAR_CHANNELS:  # the per-image form of the docstring's last paragraph
        planes = xp.reshape(b, h2, s, w2, s, c).transpose(0, 5, 2, 4, 1, 3)  # [b, c, dy, dx, h2, w2]
        taps = [
            planes[:, :, i % s, j % s, i // s : i // s + ho, j // s : j // s + wo] for i in range(k) for j in range(k)
        ]
        x_taps = jnp.stack(taps, axis=1).reshape(b, k * k * c, ho * wo)
        per_image = jax.lax.dot_general(
            x_taps, g.reshape(b, ho * wo, o), (((2,), (1,)), ((0,), (0,))), preferred_element_type=acc
        )
        return per_image.sum(axis=0).reshape(k, k, c, o).astype(x.dtype)
    if s > 1:
        xp = xp.reshape(b, h2, s, w2, s, c).transpose(0, 1, 3, 2, 4, 5)
    c2 = s * s * c
    rows = b * h2 * w2
    xf = xp.reshape(rows, c2)
    gf = jnp.pad(g, ((0, 0), (0, h2 - ho), (0, w2 - wo), (0, 0))).reshape(rows, o)
    # Contract over the minor axis of both operands (transposed copies): XLA:CPU's GEMM
    # is faster in that form than contracting the long leading axis.
    contract_minor = (((1,), (1,)), ((), ()))
    span = rows + (q - 1) * w2  # rows of X and G: every shifted product term lands in here
    xf = jnp.pad(xf, ((0, span + q - 1 - rows), (0, 0)))
    gf = jnp.pad(gf, (((q - 1) * w2, span - rows), (0, 0)))  # gf[r] now at row r + (q-1) W2
    x_taps = jnp.concatenate([xf[j : j + span] for j in range(q)], axis=1)
    g_taps = jnp.concatenate([gf[(q - 1 - i) * w2 : (q - 1 - i) * w2 + span] for i in range(q)], axis=1)
    full = jax.lax.dot_general(x_taps.T, g_taps.T, contract_minor, preferred_element_type=acc)
    full = full.reshape(q, s, s, c, q, o).transpose(4, 1, 0, 2, 3, 5)  # (j,dy,dx,c,i,o) -> (i,dy,j,dx,c,o)
    full = full.reshape(q * s, q * s, c, o)
    return full[:k, :k].astype(x.dtype)


def kernel_grad_im2col(x, g, kernel_size: int, padding: Padding):
    """Kernel gradient of a stride-1 convolution as `im2col(x)^T @ g`.

    `dk[i, j, c, o] = sum_{b,h,w} x_pad[b, h + i, w + j, c] * g[b, h, w, o]`: the k^2
    shifted copies of the input side by side (`[B*Ho*Wo, k*k*C]`) contracted with the
    output gradient over all positions, one GEMM.

    Args:
      x: `[B, H, W, C]` input; g: `[B, Ho, Wo, O]` output gradient; kernel_size, padding:
        of the convolution (square kernel, stride 1).

    Returns:
      `[k, k, C, O]` in `x`'s dtype (accumulated in at least float32).
    """
    k = kernel_size
    c, (ho, wo, o) = x.shape[-1], g.shape[1:]
    (top, bottom), (left, right) = padding
    zero = jnp.zeros((), x.dtype)
    xp = jax.lax.pad(x, zero, ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))
    cols = jnp.concatenate([xp[:, i : i + ho, j : j + wo] for i in range(k) for j in range(k)], axis=-1)
    acc = jnp.promote_types(x.dtype, jnp.float32)
    dk = jax.lax.dot_general(
        cols.reshape(-1, k * k * c), g.reshape(-1, o), (((0,), (0,)), ((), ())), preferred_element_type=acc
    )
    return dk.reshape(k, k, c, o).astype(x.dtype)


def _kernel_grad_rule(kernel_size: int, stride: int, channels: int, positions: int):
    """Which kernel gradient `conv2d` uses: 'im2col', 'gemm' or 'xla' (thresholds above)."""
    large = channels >= MIN_IM2COL_GRAD_CHANNELS or positions >= MIN_IM2COL_GRAD_POSITIONS
    if stride == 1 and channels > MAX_GEMM_GRAD_CHANNELS and large:
        return "im2col"
    if channels <= MAX_PLANAR_CHANNELS or (stride == 1 and channels <= MAX_GEMM_GRAD_CHANNELS):
        return "gemm"
    return "xla"


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x, kernel, stride: int, padding: Padding):
    """`lax.conv_general_dilated` on NHWC `x` and an HWIO square `kernel`, no dilation.

    Forward pass and input gradient are XLA's; the kernel gradient is `kernel_grad_gemm` or
    `kernel_grad_im2col` where XLA:CPU's kernel-gradient convolution is slow for the shape
    (`_kernel_grad_rule`), XLA's otherwise. Each agrees with XLA's to float32 rounding.
    """
    return _conv(x, kernel, stride, padding)


def _conv2d_fwd(x, kernel, stride, padding):
    return _conv(x, kernel, stride, padding), (x, kernel)


def _conv2d_bwd(stride, padding, residuals, g):
    x, kernel = residuals
    dx = jax.vjp(lambda x_: _conv(x_, kernel, stride, padding), x)[1](g)[0]
    k, k_w, channels, _ = kernel.shape
    rule = "xla" if k != k_w else _kernel_grad_rule(k, stride, channels, g.shape[0] * g.shape[1] * g.shape[2])
    if rule == "im2col":
        dk = kernel_grad_im2col(x, g, k, padding)
    elif rule == "gemm":
        dk = kernel_grad_gemm(x, g, k, stride, padding)
    else:
        dk = jax.vjp(lambda k_: _conv(x, k_, stride, padding), kernel)[1](g)[0]
    return dx, dk.astype(kernel.dtype)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def _pairs(value, n: int = 2) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, Sequence) else (int(value),) * n


class Conv(nn.Module):
    """`nn.Conv(..., use_bias=False)` for XLA:CPU: same call, parameter and result.

    1x1 kernels without padding run as `conv1x1_matmul`; square kernels with equal strides
    as `conv2d` (GEMM kernel gradients); anything else as `lax.conv_general_dilated`.
    """

    features: int
    kernel_size: Sequence[int]
    strides: int | Sequence[int] = 1
    padding: Any = "SAME"
    use_bias: bool = False
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = blocks.conv_kernel_init

    @nn.compact
    def __call__(self, x):
        if self.use_bias:
            raise ValueError("gg_jax.cpu.Conv has no bias; use nn.Conv for convolutions with a bias.")
        kh, kw = _pairs(self.kernel_size)
        sh, sw = _pairs(self.strides)
        kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features), self.param_dtype)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        if isinstance(self.padding, str):
            padding = tuple(jax.lax.padtype_to_pads(x.shape[1:3], (kh, kw), (sh, sw), self.padding))
        else:
            padding = tuple(tuple(p) for p in self.padding)
        if (kh, kw) == (1, 1) and sh == sw and all(p == (0, 0) for p in padding):
            return conv1x1_matmul(x, kernel, sh)
        if kh == kw and sh == sw:
            return conv2d(x, kernel, sh, padding)
        return jax.lax.conv_general_dilated(x, kernel, (sh, sw), padding, dimension_numbers=_DIMENSION_NUMBERS)
