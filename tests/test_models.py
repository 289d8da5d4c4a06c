"""gg_jax.models against the reference 3G-Net, number for number.

Golden tensors (tests/data/*_golden.npz) come from the released PyTorch 3G-Net loaded with
`make_state_dict(arch, seed=0)` (the deterministic recipe of the reference notes) on a
2x3x112x112 input; all NCHW. Our variables are those weights converted by
`gg_jax.convert.from_torch`. Architectures without golden files are compared against the
project's PyTorch reference (`tests/reference/torch_reference.py`, itself checked against the golden
files in test_torch_reference.py).
"""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gg_jax import backbones, convert, linalg, models
from tests import helpers
from tests.helpers import LAYOUT, assert_close, nchw, nhwc
from tests.reference.reference_weights import make_state_dict

GOLDEN = ["resnet18_3g", "resnet23_3g"]
RTOL = 1e-4
INTERMEDIATES = ["layer4", "reduced", "reweighted1", "reweighted2", "reweighted3", "covariance", "sqrt", "vector"]


def _capture_head(module, method_name):
    # The outputs of ChannelReduction ("reduced") and of the head itself ("vector").
    return method_name == "__call__" and module.name in ("head", "reduce")


@functools.cache
def _eval_with_intermediates(name, num_classes, dtype=jnp.float32):
    model = models.create(name, num_classes=num_classes, dtype=dtype)
    return jax.jit(
        lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"], capture_intermediates=_capture_head)
    )


def intermediates_nchw(name, variables, x_nhwc, dtype=jnp.float32):
    """Logits and the golden intermediates of our model, in the golden files' layout."""
    fn = _eval_with_intermediates(name, variables["params"]["fc"]["kernel"].shape[1], dtype)
    logits, state = fn(variables, x_nhwc)
    it = state["intermediates"]
    head = it["head"]
    out = {
        "layer4": nchw(it["layer4"][0]),
        "reduced": nchw(head["reduce"]["__call__"][0]),
        "covariance": np.asarray(head["covariance"][0]),
        "sqrt": np.asarray(head["sqrt"][0]),
        "vector": np.asarray(head["__call__"][0]),
    }
    reweighted = np.asarray(head["reweighting"]["reweighted"][0])  # [T, B, H, W, C]
    for t in range(reweighted.shape[0]):
        out[f"reweighted{t + 1}"] = nchw(reweighted[t])
    return np.asarray(logits), out, it


@pytest.fixture(scope="module", params=GOLDEN)
def golden(request):
    arch = request.param
    z = helpers.golden(arch)
    state_dict = make_state_dict(arch, seed=0, layout=LAYOUT)
    variables = convert.from_torch(state_dict, arch)
    model = models.create(arch, num_classes=z["logits_eval"].shape[1])
    return arch, model, variables, state_dict, dict(z)


def test_golden_eval_logits_and_intermediates(golden):
    arch, model, variables, _, z = golden
    logits, inter, _ = intermediates_nchw(arch, variables, nhwc(z["input_nchw"]))
    assert set(INTERMEDIATES) <= set(inter)
    for k in INTERMEDIATES:
        assert_close(inter[k], z[k], name=f"{arch}:{k}")
    assert_close(logits, z["logits_eval"], name=f"{arch}:logits_eval")
    assert logits.dtype == np.float32


def _conv1_positions(batch, height, width):
    # conv1: 7x7, stride 2, padding 3 (PyTorch output size formula).
    out = lambda n: (n + 2 * 3 - 7) // 2 + 1  # noqa: E731
    return batch * out(height) * out(width)


def test_golden_train_logits_and_running_stats(golden):
    """Training mode uses batch statistics; running stats follow PyTorch up to n/(n-1).

    Flax (and so gg_jax) updates `var <- 0.9 var + 0.1 * biased_batch_var`; PyTorch uses the
    unbiased batch variance (times n/(n-1), n = B*H*W of that BatchNorm's input). We
    convert our update to PyTorch's convention before comparing.
    """
    arch, model, variables, state_dict, z = golden
    x = nhwc(z["input_nchw"])
    fn = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    logits, updates = fn(variables, x)
    assert_close(logits, z["logits_train"], name=f"{arch}:logits_train")

    after = convert.to_torch({"params": variables["params"], "batch_stats": updates["batch_stats"]}, arch)
    b, _, h, w = z["input_nchw"].shape
    b4, _, h4, w4 = z["layer4"].shape
    stats = [k for k in z if k.startswith("after_train_forward/")]
    assert stats and any(k.endswith("running_var") for k in stats)
    biased_differs = False
    for k in stats:
        key = k.split("/", 1)[1]
        ours = np.asarray(after[key], np.float64)
        if key.endswith("running_mean"):
            # Same convention as PyTorch, so equal up to float32 rounding of the batch means.
            assert_close(ours, z[k], name=key)
            continue
        n = _conv1_positions(b, h, w) if key.startswith("bn1.") else b4 * h4 * w4
        momentum = 0.1
        old = state_dict[key].astype(np.float64)
        torch_convention = (1 - momentum) * old + (ours - (1 - momentum) * old) * n / (n - 1)
        assert_close(torch_convention, z[k], name=key)
        biased_differs |= not np.allclose(ours, z[k], rtol=1e-5, atol=0)
    # The conversion matters (the head's BNs see only n = 2*7*7 positions).
    assert biased_differs


def test_golden_conversion_is_exact(golden):
    """to_torch inverts from_torch and writes the reference layout in the reference's order."""
    arch, _, variables, state_dict, _ = golden
    back = convert.to_torch(variables, arch)
    assert list(back) == list(state_dict)
    for k, v in state_dict.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


# ------------------------------------------------------------------------ parameter counts
def _our_param_count(name, num_classes=1000):
    model = models.create(name, num_classes=num_classes)
    shapes = jax.eval_shape(
        functools.partial(model.init, train=False),
        jax.random.PRNGKey(0),
        jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32),
    )
    return sum(math.prod(s.shape) for s in jax.tree.leaves(shapes["params"]))


def _layout_param_count(arch_3g):
    layout = json.loads(LAYOUT.read_text())[arch_3g]
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    return sum(math.prod(shape) for key, shape in layout if not key.endswith(buffers))


def _torch_counts(backbone, num_classes=1000):
    """Independent counts from PyTorch modules (meta device: nothing allocated)."""
    torch = pytest.importorskip("torch")
    from torch import nn as tnn

    from tests.reference.torch_reference import ReferenceResNet3G

    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    with torch.device("meta"):
        isqrt = ReferenceResNet3G(backbone, num_classes, head="isqrt", isqrt_keys="mpncovresnet")
        gap = ReferenceResNet3G(backbone, num_classes, head="gap")
        channels, dim = gap.fc.in_features, isqrt.dim
        backbone_only = count(gap) - count(gap.fc)
        reduction = count(tnn.Conv2d(channels, dim, 1, bias=False)) + count(tnn.BatchNorm2d(dim))
        g2de = backbone_only + reduction + count(tnn.Linear((dim + 1) * (dim + 2) // 2, num_classes))
        bcnn = backbone_only + reduction + count(tnn.BatchNorm1d(dim * dim)) + count(tnn.Linear(dim * dim, num_classes))
    return {
        "isqrt": count(isqrt),
        "mpncov": count(isqrt),
        "cov": count(isqrt),
        "gap": count(gap),
        "g2de": g2de,
        "bcnn": bcnn,
    }


@pytest.mark.parametrize("backbone", sorted(b for b in backbones.BACKBONES if b.startswith("resnet")))
def test_parameter_counts(backbone):
    names = [n for n in models.names() if models.parse_name(n)[0] == backbone]
    assert {models.parse_name(n)[1] for n in names} == set(models.HEADS)
    expected = {f"{backbone}_3g": _layout_param_count(f"{backbone}_3g")}
    expected.update({f"{backbone}_{h}": c for h, c in _torch_counts(backbone).items()})
    assert sorted(expected) == sorted(names)
    ours = {n: _our_param_count(n) for n in names}
    assert ours == expected


# ---------------------------------------------------------------- a second backbone
def test_vgg_backbone_with_every_head():
    """A backbone is one file and a registry line: VGG under every head, by name. Its last map
    has ResNet-18's width (512), so the head and classifier are resnet18's exactly; the
    backbone is VGG's convolution/BN stack; a 224 image gives 14x14 (7x7 for gap)."""
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    for head in models.HEADS:
        vgg = models.create(f"vgg11_{head}", num_classes=10)
        shapes = jax.eval_shape(functools.partial(vgg.init, train=False), jax.random.PRNGKey(0), x)
        ref = jax.eval_shape(
            functools.partial(models.create(f"resnet18_{head}", num_classes=10).init, train=False),
            jax.random.PRNGKey(0),
            x,
        )
        for col in ("params", "batch_stats"):
            ours, theirs = dict(shapes.get(col, {})), dict(ref.get(col, {}))
            for module in ("head", "fc"):
                assert jax.tree.map(jnp.shape, ours.pop(module, None)) == jax.tree.map(jnp.shape, theirs.get(module)), (
                    head,
                    module,
                )
            convs = [(s, i) for s, n in enumerate((1, 1, 2, 2, 2), 1) for i in range(1, n + 1)]
            want = {f"conv{s}_{i}" for s, i in convs} if col == "params" else set()
            assert set(ours) == want | {f"bn{s}_{i}" for s, i in convs}, (head, col)
        big = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
        model16 = models.create(f"vgg16_{head}", num_classes=10)
        variables = jax.eval_shape(functools.partial(model16.init, train=False), jax.random.PRNGKey(0), big)
        _, state = jax.eval_shape(
            functools.partial(model16.apply, train=False, mutable=["intermediates"]), variables, big
        )
        side = 7 if head == "gap" else 14
        assert state["intermediates"]["layer4"][0].shape == (1, side, side, 512), head
    # It trains: one SGD step of the 3G model on random images, finite and changing the loss.
    model = models.create("vgg11_3g", num_classes=10, reduction_dim=16)
    images = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
    labels = jnp.arange(4) % 10
    variables = model.init(jax.random.PRNGKey(0), images, train=False)

    def loss(params):
        logits, _ = model.apply({**variables, "params": params}, images, train=True, mutable=["batch_stats"])
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])

    value_and_grad = jax.jit(jax.value_and_grad(loss))
    value, grads = value_and_grad(variables["params"])
    assert np.isfinite(value) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    stepped = jax.tree.map(lambda p, g: p - 0.1 * g, variables["params"], grads)
    assert float(value_and_grad(stepped)[0]) < float(value)


def test_converter_refuses_backbones_without_a_pytorch_original():
    with pytest.raises(ValueError, match="ResNet checkpoints.*vgg16"):
        convert.from_torch({}, "vgg16_3g")


# --------------------------------------------------------------- resnet50_3g vs PyTorch
def test_resnet50_3g_matches_torch_reference():
    torch = pytest.importorskip("torch")
    from tests.reference.torch_reference import ReferenceResNet3G

    torch.set_num_threads(2)
    state_dict = make_state_dict("resnet50_3g", seed=1, layout=LAYOUT)
    ref = ReferenceResNet3G("resnet50", num_classes=1000)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
    ref.eval()
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        expected, inter = ref(torch.from_numpy(x), return_intermediates=True)
    logits, ours, _ = intermediates_nchw("resnet50_3g", convert.from_torch(state_dict, "resnet50_3g"), nhwc(x))
    for k in ("layer4", "reweighted3", "sqrt"):
        assert_close(ours[k], inter[k].numpy(), name=k)
    assert_close(logits, expected.numpy(), name="resnet50_3g logits")


# ------------------------------------------------------------------------------- bf16
def test_bf16_compute_close_to_float32_with_float32_head():
    arch = "resnet18_3g"
    z = helpers.golden(arch)
    x = nhwc(z["input_nchw"])
    variables = convert.from_torch(make_state_dict(arch, seed=0, layout=LAYOUT), arch)
    m16 = models.create(arch, num_classes=1000, dtype=jnp.bfloat16)

    # Parameters of a bf16 model are float32.
    shapes = jax.eval_shape(
        functools.partial(m16.init, train=False),
        jax.random.PRNGKey(0),
        jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32),
    )
    assert {s.dtype for s in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}

    logits32, _, _ = intermediates_nchw(arch, variables, x)
    logits16, _, it = intermediates_nchw(arch, variables, x, dtype=jnp.bfloat16)
    head = it["head"]
    # The backbone and the re-weighting run in bf16; covariance, sqrt, vector, logits in f32.
    assert it["layer4"][0].dtype == jnp.bfloat16
    reweighted = head["reweighting"]["reweighted"][0]
    assert reweighted.dtype == jnp.bfloat16
    for k in ("covariance", "sqrt", "__call__"):
        assert head[k][0].dtype == jnp.float32, k
    assert logits16.dtype == np.float32
    # The covariance is computed in f32 from the bf16 features: it equals the f32
    # computation, which the same statistic computed in bf16 does not.
    feats = reweighted[-1].reshape(reweighted.shape[1], -1, reweighted.shape[-1])
    f32_cov = linalg.covariance(feats.astype(jnp.float32))
    assert_close(head["covariance"][0], f32_cov, rtol=1e-5, name="covariance")
    centred = feats - feats.mean(axis=1, keepdims=True)
    bf16_cov = jnp.einsum("bnc,bnd->bcd", centred, centred, preferred_element_type=jnp.bfloat16) / feats.shape[1]
    with pytest.raises(AssertionError):
        assert_close(bf16_cov, f32_cov, rtol=1e-5)

    # bf16 keeps ~3 significant digits per op; here the logits agree to <1% (measured 0.7%).
    err = np.linalg.norm(logits16 - logits32) / np.linalg.norm(logits32)
    assert err < 0.03, err
    assert (logits16.argmax(-1) == logits32.argmax(-1)).all()


# ----------------------------------------------------------------------------- errors
def test_unknown_model_name_lists_valid_names():
    for fn in (
        lambda: models.create("resnet50_3gg", num_classes=10),
        lambda: convert.from_torch({}, "resnet51_3g"),
        lambda: convert.to_torch({}, "vgg19_3g"),
    ):
        with pytest.raises(ValueError) as e:
            fn()
        for valid in models.names():
            assert valid in str(e.value)


def test_unknown_option_lists_valid_options():
    with pytest.raises(ValueError, match="num_blocks") as e:
        models.create("resnet18_3g", num_classes=10, num_blockz=2)
    assert "num_blockz" in str(e.value)
    with pytest.raises(ValueError, match="num_blocks") as e:
        convert.from_torch(make_state_dict("resnet18_3g", seed=0, layout=LAYOUT), "resnet18_3g", num_blockz=2)
    assert "num_blockz" in str(e.value)
