"""gg_jax.cpu: the CPU convolutions against XLA's and nn.Conv, where they are used (and where
not: no CPU code in programs for GPU/TPU), the train step's compiler option, malloc tuning."""

import functools
import os
import pathlib
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gg_jax.cpu
from gg_jax import models, sharding
from gg_jax.backbones import blocks
from gg_jax.cpu import conv, malloc
from gg_jax.training import optim, steps
from gg_jax.training import state as state_lib
from tests import runs


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
    ours = conv.Conv(16, (3, 3), stride, **kw)
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
        "from gg_jax.cpu import malloc; malloc.reexec_with_hugepages(); import os, sys; "
        "print(os.environ.get('GLIBC_TUNABLES', ''), sys.argv[1:])"
    )
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run(
        [sys.executable, "-c", code, "a", "--b=1"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=runs.HANG_GUARD_S,
    )
    applies = (
        sys.platform.startswith("linux")
        and malloc._thp_mode() == "madvise"
        and (malloc._glibc_version() or (0, 0)) >= (2, 35)
    )
    assert out.stdout.split()[0:1] == (["glibc.malloc.hugetlb=1"] if applies else [])
    assert "['a', '--b=1']" in out.stdout
    off = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(env, GG_JAX_HUGEPAGES="0"),
        capture_output=True,
        text=True,
        check=True,
        timeout=runs.HANG_GUARD_S,
    )
    assert "glibc.malloc.hugetlb" not in off.stdout


def test_reexec_with_tunables_keeps_freed_memory():
    """`reexec_with_tunables(*KEEP_FREED_MEMORY)` adds the tunables not set yet (keeping the
    values already there), and with them glibc reuses a freed 64 MiB block: allocating it
    again costs no page faults, where default glibc maps and faults it in again."""
    if not (sys.platform.startswith("linux") and malloc._glibc_version()):
        pytest.skip("glibc only")
    code = (
        "from gg_jax.cpu import malloc; malloc.reexec_with_tunables(*malloc.KEEP_FREED_MEMORY)\n"
        "import ctypes, os, resource\n"
        "libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p; libc.free.argtypes = [ctypes.c_void_p]\n"
        "def faults():\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    block = libc.malloc(1 << 26); ctypes.memset(block, 1, 1 << 26); libc.free(block)\n"  # 64 MiB
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n"
        "faults()\n"
        "print(os.environ['GLIBC_TUNABLES'], malloc.keeps_freed_memory(), faults())\n"
    )

    def run(tunables):
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        env["GLIBC_TUNABLES"] = tunables
        out = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=runs.HANG_GUARD_S,
        )
        setting, keeps, faults = out.stdout.split()
        return setting.split(":"), keeps == "True", int(faults)

    setting, keeps, faults = run("")
    assert setting == list(malloc.KEEP_FREED_MEMORY) and keeps
    assert faults < 100  # a 64 MiB block faulted in afresh takes >= 16,384 faults (4 KiB pages)
    setting, keeps, faults = run("glibc.malloc.mmap_max=65536")  # the user's value wins
    assert setting[0] == "glibc.malloc.mmap_max=65536" and "glibc.malloc.arena_max=1" in setting and not keeps
    if malloc._thp_mode() != "always":  # else 2 MiB pages: few faults either way
        assert faults > 10_000


# ----------------------------------------------------------------------------- 1x1 convolutions


@pytest.mark.parametrize("stride,size", [(1, 7), (2, 7), (2, 8), (3, 10)])
def test_conv1x1_matmul_is_pytorchs_1x1_convolution_with_gradients(stride, size):
    """`conv1x1_matmul` (CPU) and an XLA convolution (`Conv1x1`, what GPUs and TPUs run) are one
    function: PyTorch's 1x1 convolution with padding 0, odd and even sizes, strides 1-3."""
    rng = np.random.default_rng(stride * 100 + size)
    x = jnp.asarray(rng.standard_normal((2, size, size + 1, 5)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 1, 5, 3)), jnp.float32)
    want = np.einsum("bhwc,co->bhwo", np.asarray(x, np.float64)[:, ::stride, ::stride], np.asarray(k, np.float64)[0, 0])
    module = blocks.Conv1x1(3, strides=stride)

    def xla(x, k):
        return module.apply({"params": {"kernel": k}}, x)

    def matmul(x, k):
        return conv.conv1x1_matmul(x, k, stride)

    for form in (matmul, xla):
        got = np.asarray(form(x, k), np.float64)
        assert got.shape == want.shape and np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    g = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)
    grads = [jax.grad(lambda x, k, f=f: jnp.vdot(f(x, k), g), argnums=(0, 1))(x, k) for f in (matmul, xla)]
    for a, b in zip(grads[0], grads[1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


@pytest.mark.parametrize("kernel,stride,padding", [(1, 1, "VALID"), (1, 2, ((0, 0), (0, 0))), (1, 1, "SAME")])
def test_cpu_conv_1x1_is_a_matmul_with_nn_convs_parameter(kernel, stride, padding):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 9, 4))
    ours = conv.Conv(8, (kernel, kernel), stride, padding=padding)
    theirs = nn.Conv(
        8, (kernel, kernel), stride, padding=padding, use_bias=False, kernel_init=conv.blocks.conv_kernel_init
    )
    v = ours.init(jax.random.PRNGKey(1), x)
    np.testing.assert_array_equal(v["params"]["kernel"], theirs.init(jax.random.PRNGKey(1), x)["params"]["kernel"])
    np.testing.assert_allclose(ours.apply(v, x), theirs.apply(v, x), rtol=1e-5, atol=1e-5)
    hlo = jax.jit(jax.grad(lambda v: jnp.sum(ours.apply(v, x) ** 2))).lower(v).as_text()
    assert "dot_general" in hlo and "convolution" not in hlo


# ----------------------------------------------------------------------------- where CPU code runs


def _platform_programs(name, platform, image_size, num_classes=10, **options):
    """StableHLO text of the eval forward pass and of the train step of `name` built for `platform`."""
    model = models.create(name, num_classes=num_classes, platform=platform, **options)
    tx = optim.create_optimizer(0.1)
    state = state_lib.abstract_train_state(model, tx)
    batch = {
        "image": jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32),
        "label": jax.ShapeDtypeStruct((2,), jnp.int32),
    }
    train = jax.jit(functools.partial(steps.train_step, model=model, tx=tx))
    forward = jax.jit(functools.partial(model.apply, train=False))
    export = functools.partial(jax.export.export, platforms=[platform])
    return (
        export(forward)(state.variables, batch["image"]).mlir_module(),
        export(train)(state, batch).mlir_module(),
        model,
    )


def _rank2_dot_shapes(mlir: str):
    """The operand and result shapes of every dot_general whose operands are matrices."""
    found = []
    for line in mlir.splitlines():
        if "stablehlo.dot_general" in line:
            types = re.findall(r"tensor<([0-9x]+)x[a-z]+[0-9]*>", line.split(" : ")[-1])
            shapes = [tuple(int(d) for d in t.split("x")) for t in types]
            if shapes and all(len(s) == 2 for s in shapes[:2]):
                found.append(shapes)
    return found


def _check_accelerator_form(forward: str, train: str, num_classes: int):
    """Every convolution is an XLA convolution and every gradient XLA's own: the train step holds
    three per forward convolution (output, kernel gradient, input gradient; the stem has no input
    gradient), and the only matrix-by-matrix products are the classifier's."""
    n = forward.count("stablehlo.convolution")
    assert n > 0 and train.count("stablehlo.convolution") == 3 * n - 1
    for shapes in _rank2_dot_shapes(train):
        assert any(num_classes in s for s in shapes), shapes  # a 1x1 convolution or CPU kernel gradient


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_resnet50_3g_train_step_for_gpu_and_tpu_has_no_cpu_code(platform):
    """`jax.export` for CUDA/TPU on this CPU machine: plain XLA convolutions only."""
    forward, train, model = _platform_programs("resnet50_3g", platform, 224, num_classes=1000)
    assert model.backbone.conv is blocks.Conv
    _check_accelerator_form(forward, train, 1000)


def test_every_head_lowers_for_gpu_and_tpu_without_cpu_code_and_cpu_gets_matmuls():
    for head in models.HEADS:
        for platform in ("cuda", "tpu"):
            forward, train, _ = _platform_programs(f"resnet18_{head}", platform, 32, reduction_dim=8)
            _check_accelerator_form(forward, train, 10)
    forward, train, model = _platform_programs("resnet18_3g", "cpu", 32, reduction_dim=8)
    assert model.backbone.conv is conv.Conv
    assert train.count("stablehlo.convolution") < 3 * forward.count("stablehlo.convolution") - 1
    assert any(not any(10 in s for s in shapes) for shapes in _rank2_dot_shapes(train))  # 1x1 matmuls


def test_cpu_train_step_updates_parameters_without_copying_them():
    """On CPU the step is compiled with region-analysis copy insertion (`cpu.compiler_options`):
    the classifier weight (and most other parameters) is updated in place without a copy
    first, and the new state is bitwise the one the default copy insertion gives."""
    if jax.default_backend() != "cpu":
        pytest.skip("CPU compiler option")
    assert gg_jax.cpu.compiler_options("cuda") == {} and gg_jax.cpu.compiler_options("tpu") == {}
    model = models.create("resnet18_3g", num_classes=10, reduction_dim=16, num_blocks=1)
    tx = optim.create_optimizer(0.1)
    mesh = sharding.make_mesh()
    state_sharding = sharding.replicated_tree(state_lib.abstract_train_state(model, tx), mesh)
    step_fn = steps.jit_train_step(model, tx, mesh, state_sharding, seed=0)
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.standard_normal((8, 48, 48, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 10, 8), jnp.int32),
    }

    def fresh():
        return state_lib.create_train_state(model, tx, rng=jax.random.PRNGKey(0), sharding=state_sharding)

    lowered = step_fn.lower(fresh(), batch)
    ours = lowered.compile()
    default = lowered.compile(compiler_options={"xla_cpu_copy_insertion_use_region_analysis": False})

    def copied_params(compiled):
        entry = compiled.as_text().split("ENTRY", 1)[1]
        return [line for line in entry.splitlines() if " copy(%state_params" in line]

    assert any("fc____kernel" in line for line in copied_params(default))
    assert not any("fc____kernel" in line for line in copied_params(ours))
    assert len(copied_params(ours)) < len(copied_params(default)) / 4
    new_ours, m_ours = ours(fresh(), batch)
    new_default, m_default = default(fresh(), batch)
    for a, b in zip(jax.tree.leaves((new_ours, m_ours)), jax.tree.leaves((new_default, m_default))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- malloc


def _fake_accelerator_plugin(tmp_path):
    """A directory that makes a `jax_plugins` package importable, as a GPU/TPU plugin does."""
    plugin = tmp_path / "plugins" / "jax_plugins" / "xla_fake_gpu"
    plugin.mkdir(parents=True)
    (plugin / "__init__.py").write_text("def initialize():\n    pass\n")
    return str(tmp_path / "plugins")


def test_jax_runs_on_cpu_only_decides_without_starting_jax(tmp_path):
    code = "import sys; from gg_jax.cpu import malloc; print(malloc.jax_runs_on_cpu_only(), 'jax' in sys.modules)"
    base = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "JAX_PLATFORM_NAME")}

    def ask(**env):
        out = subprocess.run(
            [sys.executable, "-c", code],
            env=dict(base, **env),
            capture_output=True,
            text=True,
            timeout=runs.HANG_GUARD_S,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    assert ask(JAX_PLATFORMS="cpu") == ["True", "False"]
    assert ask(JAX_PLATFORMS="cuda") == ["False", "False"]
    assert ask(JAX_PLATFORMS="tpu,cpu") == ["False", "False"]
    plugins = _fake_accelerator_plugin(tmp_path)
    assert ask(PYTHONPATH=os.pathsep.join([plugins, base.get("PYTHONPATH", "")]))[0] == "False"


def test_entry_points_never_reexecute_on_accelerator_hosts(tmp_path):
    """train.py and evaluate.py tune malloc (re-executing with GLIBC_TUNABLES) only where JAX
    runs on the CPU alone: with JAX_PLATFORMS=cuda or an accelerator plugin installed they run
    in the process they started in. Both stop at a missing dataset, after the decision."""
    if not (sys.platform.startswith("linux") and malloc._thp_mode() == "madvise" and malloc._glibc_version()):
        pytest.skip("huge pages for malloc apply to Linux with THP mode 'madvise' only")
    repo = pathlib.Path(__file__).resolve().parents[1]
    base = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "GLIBC_TUNABLES", "GG_JAX_HUGEPAGES")}
    base["PYTHONPATH"] = str(repo)
    flags = ["--config=configs/demo.py", "--config.dataset.name=image_folder", f"--config.dataset.data_dir={tmp_path}"]
    plugins = _fake_accelerator_plugin(tmp_path)
    train, evaluate = ("train.py", [f"--workdir={tmp_path / 'w'}"]), ("evaluate.py", [f"--checkpoint={tmp_path}"])
    for (script, extra), env, tuned in (
        (train, {}, True),
        (train, {"JAX_PLATFORMS": "cuda"}, False),
        (evaluate, {"PYTHONPATH": os.pathsep.join([plugins, str(repo)])}, False),
        (evaluate, {}, True),
    ):
        out = runs.run([script, *flags, *extra], dict(base, **env), check=False)
        log = out.stdout + out.stderr
        assert out.returncode == 1, log[-3000:]  # the missing dataset (or, for cuda/tpu here, no such backend)
        assert ("malloc: transparent huge pages" in log) == tuned, (script, env, log[-3000:])
        if tuned:  # The missing dataset, printed once, as the one `error:` line.
            assert log.count("No image folder at") == 1 and out.stderr.count("error: ") == 1, log[-3000:]
