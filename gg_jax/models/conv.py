"""2-d convolution whose kernel gradient is a matrix product on CPU.

XLA:CPU computes the kernel gradient of a convolution as another convolution in which
the images of the batch are the contracted "features". For some shapes that convolution
is slow: at batch 4 about 21 ms for one ResNet `layer1` 3x3 convolution (64 channels,
where the forward pass takes about 6 ms), 26 ms for the 7x7/2 stem on RGB input and
16.5-17.4 ms for a `layer4` 3x3 convolution (512 channels, 14x14 in 3G-Net), and it
slows down abruptly with the batch (a `layer2` one: 5 ms at batch 4, 41 at batch 8).
`conv2d` computes those gradients as GEMMs over shifted copies of the input instead
(`kernel_grad_gemm`, `kernel_grad_im2col`): 8-10, 14-15, 13.7-13.9 and 29 ms. The forward
pass and the input gradient stay XLA's, and on GPU and TPU (`jax.lax.platform_dependent`)
so does the kernel gradient. `python benchmarks/bench_ops.py --threads 2` times the
convolutions of the step against PyTorch.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Padding = tuple[tuple[int, int], tuple[int, int]]

#: Stride-1 inputs with at most this many channels take the GEMM kernel gradient on CPU.
#: Measured at batch 4 (kernel gradient alone, one-off timing of both functions): 64
#: channels at 56x56 2.3x faster than XLA; 128 channels at 28x28 and 256 at 14x14 slower,
#: so those stay with XLA.
MAX_GEMM_GRAD_CHANNELS = 64

#: Stride-1 inputs with more than `MAX_GEMM_GRAD_CHANNELS` channels take the im2col
#: kernel gradient on CPU when they have at least `MIN_IM2COL_GRAD_CHANNELS` channels or
#: the output at least `MIN_IM2COL_GRAD_POSITIONS` positions (batch x height x width):
#: XLA:CPU's kernel-gradient convolution slows down abruptly beyond a size. Measured 3x3
#: kernel gradients (ms, XLA -> im2col; one-off timings of both functions):
#:   512 ch: 7x7 batch 4 10.0-11.6 -> 5.0-6.7, batch 16 21.5 -> 18.5-19.3;
#:           14x14 batch 4 16.5-17.4 -> 13.7-13.9, batch 32 299-306 -> 169-171
#:   256 ch, 14x14: batch 4 4.6-4.8 -> 4.6-4.7, 8 11.0 -> 12.6-14.7, 16 23.5 -> 31-37,
#:           32 74-76 -> 57-60
#:   128 ch, 28x28: batch 4 4.7-5.7 -> 5.9-7.9, 8 41-43 -> 29, 16 101 -> 44-51,
#:           32 170-178 -> 89-90; 56x56 batch 2 47-50 -> 24-26
MIN_IM2COL_GRAD_CHANNELS = 512
MIN_IM2COL_GRAD_POSITIONS = 6272

#: Inputs with at most this many channels (RGB images), any stride, take the per-image
#: "planar" GEMM kernel gradient on CPU: the 7x7/2 stem at batch 4, 26 ms in XLA:CPU,
#: 14-15 ms (PyTorch/oneDNN: 3.4 ms). With 64 channels it is slower than the shifted form.
MAX_PLANAR_CHANNELS = 4

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
    output gradient over all positions. With many channels each copy moves long
    contiguous runs, and the one GEMM is what XLA:CPU runs fastest.

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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x, kernel, stride: int, padding: Padding):
    """`lax.conv_general_dilated` on NHWC `x` and an HWIO square `kernel`, no dilation.

    Forward pass and input gradient are XLA's everywhere, and so is the kernel gradient
    on GPU and TPU. On CPU, where XLA:CPU's kernel-gradient convolutions are slow for some
    shapes, the kernel gradient is a matrix product instead:
    - kernel gradient of stride-1 convolutions with at most `MAX_GEMM_GRAD_CHANNELS`
      input channels, and of any convolution of an input with at most
      `MAX_PLANAR_CHANNELS` channels: `kernel_grad_gemm`;
    - kernel gradient of stride-1 convolutions with more input channels, when they have
      at least `MIN_IM2COL_GRAD_CHANNELS` of them or at least `MIN_IM2COL_GRAD_POSITIONS`
      output positions: `kernel_grad_im2col`.
    Each agrees with XLA's convolution to float32 rounding (tests/test_conv.py).
    """
    return _conv(x, kernel, stride, padding)


def _conv2d_fwd(x, kernel, stride, padding):
    return _conv(x, kernel, stride, padding), (x, kernel)


def _conv2d_bwd(stride, padding, residuals, g):
    x, kernel = residuals
    dx = jax.vjp(lambda x_: _conv(x_, kernel, stride, padding), x)[1](g)[0]

    def xla_grad(x, g):
        return jax.vjp(lambda k_: _conv(x, k_, stride, padding), kernel)[1](g)[0]

    k, k_w, channels, _ = kernel.shape
    if k != k_w:
        return dx, xla_grad(x, g)
    positions = g.shape[0] * g.shape[1] * g.shape[2]
    large = channels >= MIN_IM2COL_GRAD_CHANNELS or positions >= MIN_IM2COL_GRAD_POSITIONS
    if stride == 1 and channels > MAX_GEMM_GRAD_CHANNELS and large:

        def cpu_grad(x, g):
            return kernel_grad_im2col(x, g, k, padding).astype(kernel.dtype)
    elif channels <= MAX_PLANAR_CHANNELS or (stride == 1 and channels <= MAX_GEMM_GRAD_CHANNELS):

        def cpu_grad(x, g):
            return kernel_grad_gemm(x, g, k, stride, padding).astype(kernel.dtype)
    else:
        return dx, xla_grad(x, g)
    return dx, jax.lax.platform_dependent(x, g, cpu=cpu_grad, default=xla_grad)


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
