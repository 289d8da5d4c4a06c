"""gg_jax.models.conv: the GEMM kernel gradient against XLA's, and the module against nn.Conv."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gg_jax import hugepages
from gg_jax.models import conv


def _xla_kernel_grad(x, kernel, g, stride, padding):
    return jax.vjp(lambda k: conv._conv(x, k, stride, padding), kernel)[1](g)[0]


@pytest.mark.parametrize(
    "shape,out,k,stride,pad",
    [
        ((2, 56, 56, 64), 64, 3, 1, 1),  # ResNet layer1
        ((2, 32, 32, 3), 16, 7, 2, 3),  # ResNet stem (smaller image)
        ((2, 17, 13, 5), 7, 3, 2, 1),  # odd sizes, stride 2
        ((1, 9, 9, 4), 3, 5, 3, 2),  # stride 3
        ((2, 8, 8, 4), 6, 3, 2, 0),  # no padding: trailing row unread
        ((2, 7, 7, 4), 6, 2, 1, 0),  # even kernel
        ((3, 6, 6, 2), 2, 3, 1, 1),  # few channels: input-only taps
    ],
)
def test_kernel_grad_gemm_equals_xla(shape, out, k, stride, pad):
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    kernel = jax.random.normal(jax.random.PRNGKey(1), (k, k, shape[-1], out))
    padding = ((pad, pad), (pad, pad))
    g = jax.random.normal(jax.random.PRNGKey(2), conv._conv(x, kernel, stride, padding).shape)
    want = np.asarray(_xla_kernel_grad(x, kernel, g, stride, padding), np.float64)
    got = np.asarray(jax.jit(conv.kernel_grad_gemm, static_argnums=(2, 3, 4))(x, g, k, stride, padding))
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.abs(got - want).max() <= 2e-5 * np.abs(want).max()


@pytest.mark.parametrize("channels,stride", [(3, 1), (3, 2), (6, 1), (6, 2)])  # planar and shifted forms
def test_kernel_grad_gemm_float64_is_exact_sum(channels, stride):
    """In float64 the GEMM gradient is the same sum as XLA's to 1e-12 (no term lost or doubled)."""
    assert (channels <= conv.MAX_PLANAR_CHANNELS) == (channels == 3)
    with jax.enable_x64():
        x = jax.random.normal(jax.random.PRNGKey(0), (2, 11, 10, channels), jnp.float64)
        kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, channels, 5), jnp.float64)
        padding = ((1, 1), (1, 1))
        g = jax.random.normal(jax.random.PRNGKey(2), conv._conv(x, kernel, stride, padding).shape, jnp.float64)
        want = _xla_kernel_grad(x, kernel, g, stride, padding)
        got = conv.kernel_grad_gemm(x, g, 3, stride, padding)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "shape,out,k,pad",
    [
        ((2, 14, 14, 32), 16, 3, (1, 1)),
        ((2, 9, 7, 8), 4, 3, (0, 0)),
        ((1, 8, 8, 4), 6, 5, (2, 1)),
        ((2, 7, 7, 4), 6, 2, (0, 1)),
    ],
)
def test_kernel_grad_im2col_equals_xla(shape, out, k, pad):
    """Stride 1, odd sizes, no or uneven padding, even kernels: the same sum as XLA's (float64)."""
    with jax.enable_x64():
        x = jax.random.normal(jax.random.PRNGKey(0), shape, jnp.float64)
        kernel = jax.random.normal(jax.random.PRNGKey(1), (k, k, shape[-1], out), jnp.float64)
        padding = (pad, pad)
        g = jax.random.normal(jax.random.PRNGKey(2), conv._conv(x, kernel, 1, padding).shape, jnp.float64)
        want = _xla_kernel_grad(x, kernel, g, 1, padding)
        got = conv.kernel_grad_im2col(x, g, k, padding)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-12)
    x32, g32 = x.astype(jnp.float32), g.astype(jnp.float32)
    got32 = jax.jit(conv.kernel_grad_im2col, static_argnums=(2, 3))(x32, g32, k, padding)
    assert got32.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got32), np.asarray(want), rtol=0, atol=2e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize("stride,channels", [(1, 8), (2, 8), (1, conv.MAX_GEMM_GRAD_CHANNELS + 1)])
def test_conv_module_matches_nn_conv(stride, channels):
    """Same parameter (shape and initial values), same output, same gradients as nn.Conv."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 12, channels))
    kw = dict(padding=((1, 1), (1, 1)), kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"))
    ours = conv.Conv(16, 3, stride, **kw)
    flax_conv = nn.Conv(16, (3, 3), strides=(stride, stride), use_bias=False, **kw)
    v_ours = ours.init(jax.random.PRNGKey(3), x)
    v_flax = flax_conv.init(jax.random.PRNGKey(3), x)
    np.testing.assert_array_equal(v_ours["params"]["kernel"], v_flax["params"]["kernel"])

    def loss(module, v, x):
        return jnp.sum(jnp.sin(module.apply(v, x)))

    np.testing.assert_allclose(ours.apply(v_ours, x), flax_conv.apply(v_flax, x), rtol=1e-6, atol=1e-6)
    g_ours = jax.jit(jax.grad(lambda v, x: loss(ours, v, x), argnums=(0, 1)))(v_ours, x)
    g_flax = jax.grad(lambda v, x: loss(flax_conv, v, x), argnums=(0, 1))(v_flax, x)
    for a, b in zip(jax.tree_util.tree_leaves(g_ours), jax.tree_util.tree_leaves(g_flax)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * float(jnp.abs(b).max()))


@pytest.mark.parametrize(
    "channels,size,stride,gemm",
    [
        (8, 10, 1, True),
        (3, 10, 2, True),
        (conv.MIN_IM2COL_GRAD_CHANNELS, 10, 1, True),
        (128, 10, 1, False),
        (128, 56, 1, True),
        (128, 56, 2, False),
        (8, 10, 2, False),
    ],
)
def test_cpu_kernel_gradient_rule(channels, size, stride, gemm):
    """On CPU the kernel gradient is a GEMM (no convolution in the compiled backward) for
    stride-1 inputs with <= 64 or >= 512 channels or >= 6272 output positions (2x56x56),
    and for RGB-like inputs at any stride; XLA's kernel-gradient convolution otherwise."""
    x = jnp.ones((2, size, size, channels))
    kernel = jnp.ones((3, 3, channels, 4))
    grad = jax.jit(jax.grad(lambda k: jnp.sum(conv.conv2d(x, k, stride, ((1, 1), (1, 1))))))
    hlo = grad.lower(kernel).as_text()
    if jax.default_backend() == "cpu":
        assert ("dot_general" in hlo and "convolution" not in hlo) == gemm


def test_hugepages_reexec_sets_the_tunable():
    """A script calling reexec_with_hugepages runs again with the glibc tunable set, or is
    left alone where it does not apply (and with GG_JAX_HUGEPAGES=0)."""
    code = (
        "from gg_jax import hugepages; hugepages.reexec_with_hugepages(); import os, sys; "
        "print(os.environ.get('GLIBC_TUNABLES', ''), sys.argv[1:])"
    )
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run(
        [sys.executable, "-c", code, "a", "--b=1"], env=env, capture_output=True, text=True, check=True
    )
    applies = (
        sys.platform.startswith("linux")
        and hugepages._thp_mode() == "madvise"
        and hugepages._glibc_has_hugetlb_tunable()
    )
    assert out.stdout.split()[0:1] == (["glibc.malloc.hugetlb=1"] if applies else [])
    assert "['a', '--b=1']" in out.stdout
    off = subprocess.run(
        [sys.executable, "-c", code], env=dict(env, GG_JAX_HUGEPAGES="0"), capture_output=True, text=True, check=True
    )
    assert "glibc.malloc.hugetlb" not in off.stdout


def test_reexec_with_tunables_keeps_freed_memory():
    """`reexec_with_tunables(*KEEP_FREED_MEMORY)` adds the tunables not set yet (keeping the
    values already there), and with them glibc reuses a freed 64 MiB block: allocating it
    again costs no page faults, where default glibc maps and faults it in again."""
    if not (sys.platform.startswith("linux") and hugepages._glibc_version()):
        pytest.skip("glibc only")
    code = (
        "from gg_jax import hugepages; hugepages.reexec_with_tunables(*hugepages.KEEP_FREED_MEMORY)\n"
        "import ctypes, os, resource\n"
        "libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p; libc.free.argtypes = [ctypes.c_void_p]\n"
        "def faults():\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    block = libc.malloc(1 << 26); ctypes.memset(block, 1, 1 << 26); libc.free(block)\n"  # 64 MiB
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n"
        "faults()\n"
        "print(os.environ['GLIBC_TUNABLES'], hugepages.keeps_freed_memory(), faults())\n"
    )

    def run(tunables):
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        env["GLIBC_TUNABLES"] = tunables
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        setting, keeps, faults = out.stdout.split()
        return setting.split(":"), keeps == "True", int(faults)

    setting, keeps, faults = run("")
    assert setting == list(hugepages.KEEP_FREED_MEMORY) and keeps
    assert faults < 100  # a 64 MiB block faulted in afresh takes >= 16,384 faults (4 KiB pages)
    setting, keeps, faults = run("glibc.malloc.mmap_max=65536")  # the user's value wins
    assert setting[0] == "glibc.malloc.mmap_max=65536" and "glibc.malloc.arena_max=1" in setting and not keeps
    if hugepages._thp_mode() != "always":  # else 2 MiB pages: few faults either way
        assert faults > 10_000
