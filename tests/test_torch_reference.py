"""The project's PyTorch reference (tests/reference/torch_reference.py) is exactly the released model.

Golden tensors (tests/data/*_golden.npz) come from the released 3G-Net PyTorch code
loaded with make_state_dict(arch, seed=0) on a 2x3x112x112 input. Once these pass, the
reference can serve as an oracle for architectures with no golden file (resnet50/101,
the iSQRT-COV and GAP baselines).
"""

import functools
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests import helpers  # noqa: E402
from tests.helpers import LAYOUT, assert_close  # noqa: E402
from tests.reference.reference_weights import load_layout, make_state_dict  # noqa: E402
from tests.reference.torch_reference import (  # noqa: E402
    ARCHS,
    CovPoolFunction,
    ReferenceResNet3G,
    SqrtNewtonSchulzFunction,
    cov_pool,
    layout_of,
    make_torch_state_dict,
    random_state_dict,
    sqrt_newton_schulz,
    tril_vec_per_sample,
)

torch.set_num_threads(2)

GOLDEN_ARCHS = ["resnet18", "resnet23"]
RTOL = 1e-4


@functools.cache
def seed0_state_dict(arch_key):
    """make_state_dict(arch_key, seed=0) as torch tensors (cached: ~2 s per call)."""
    return make_torch_state_dict(arch_key, seed=0, layout=LAYOUT)


@pytest.fixture(scope="module", params=GOLDEN_ARCHS)
def golden(request):
    arch = request.param
    z = helpers.golden(f"{arch}_3g")
    model = ReferenceResNet3G(arch, num_classes=1000)
    model.load_state_dict(seed0_state_dict(f"{arch}_3g"), strict=True)
    return arch, model, dict(z)


def test_golden_eval_intermediates(golden):
    arch, model, z = golden
    model.load_state_dict(seed0_state_dict(f"{arch}_3g"), strict=True)
    model.eval()
    with torch.no_grad():
        logits, inter = model(torch.from_numpy(z["input_nchw"]), return_intermediates=True)
    keys = ["layer4", "reduced", "reweighted1", "reweighted2", "reweighted3", "covariance", "sqrt", "vector"]
    for k in keys:
        assert_close(inter[k].numpy(), z[k], name=f"{arch}:{k}")
    assert_close(logits.numpy(), z["logits_eval"], name=f"{arch}:logits_eval")
    assert torch.equal(inter["logits"], logits)


def test_golden_train_forward_and_running_stats(golden):
    arch, model, z = golden
    model.load_state_dict(seed0_state_dict(f"{arch}_3g"), strict=True)
    model.train()
    with torch.no_grad():
        logits = model(torch.from_numpy(z["input_nchw"]))
    assert_close(logits.numpy(), z["logits_train"], name=f"{arch}:logits_train")
    sd = model.state_dict()
    stats = [k for k in z if k.startswith("after_train_forward/")]
    assert len(stats) == 8
    for k in stats:
        assert_close(sd[k.split("/", 1)[1]].numpy(), z[k], name=f"{arch}:{k}")
    assert int(sd["bn1.num_batches_tracked"]) == 1


@pytest.mark.parametrize("arch", list(ARCHS))
def test_state_dict_matches_layout(arch):
    expected = [(k, tuple(s)) for k, s in json.loads(LAYOUT.read_text())[f"{arch}_3g"]]
    with torch.device("meta"):  # shapes only: no allocation, resnet152 included
        model = ReferenceResNet3G(arch)
    assert layout_of(model) == expected


def test_parameter_counts():
    counts = {}
    for arch in ("resnet50", "resnet101"):
        with torch.device("meta"):
            model = ReferenceResNet3G(arch)
        counts[arch] = sum(p.numel() for p in model.parameters())
    assert counts == {"resnet50": 57_970_283, "resnet101": 76_962_411}
    with torch.device("meta"):
        block = ReferenceResNet3G("resnet50").AtMp1
    assert sum(p.numel() for p in block.parameters()) == 346_817


def test_make_state_dict_recipe():
    a = make_state_dict("resnet18_3g", seed=0, layout=LAYOUT)
    full = seed0_state_dict("resnet18_3g")
    assert list(a) == [k for k, _ in load_layout("resnet18_3g", LAYOUT)] == list(full)
    assert all(np.array_equal(a[k], full[k].numpy()) for k in a)
    assert a["bn1.num_batches_tracked"].dtype == np.int64
    assert a["bn1.num_batches_tracked"].shape == ()
    assert all(v.dtype == np.float32 for k, v in a.items() if "num_batches" not in k)
    # Draws are sequential in layout order, so a prefix of the layout (a list of
    # (key, shape) pairs) gives the prefix of the state dict; the default layout is
    # tests/data/layout.json.
    prefix = load_layout("resnet18_3g")[:40]
    b = make_state_dict(None, seed=0, layout=prefix)
    assert list(b) == list(a)[:40] and all(np.array_equal(a[k], b[k]) for k in b)
    c = make_state_dict(None, seed=1, layout=prefix)
    assert not np.array_equal(b["conv1.weight"], c["conv1.weight"])
    with pytest.raises(KeyError, match="resnet18_3g"):
        make_state_dict("resnet19_3g", layout=LAYOUT)


def test_init_matches_reference_recipe():
    torch.manual_seed(0)
    model = ReferenceResNet3G("resnet18", num_classes=10)
    w = model.AtMp1.map1.weight
    assert abs(w.std().item() - np.sqrt(2.0 / 256)) < 0.1 * np.sqrt(2.0 / 256)  # fan_out
    assert torch.all(model.AtMp2.bnat1.weight == 1) and torch.all(model.bn1.bias == 0)
    bound = 1 / np.sqrt(32896)
    assert model.fc.weight.abs().max().item() <= bound  # PyTorch default linear init


# ------------------------------------------------------------------- isqrt / gap heads
def test_isqrt_key_names():
    with torch.device("meta"):
        nm = ReferenceResNet3G("resnet50", head="isqrt")
        mp = ReferenceResNet3G("resnet50", head="isqrt", isqrt_keys="mpncovresnet")
        pre = ReferenceResNet3G("resnet50", head="isqrt", isqrt_keys="newmodel_pretrained")
    nm_keys, mp_keys = layout_of(nm), layout_of(mp)
    d = dict(nm_keys)
    assert d["features.0.weight"] == (64, 3, 7, 7)
    assert d["features.1.running_var"] == (64,)
    assert d["features.4.0.conv1.weight"] == (64, 64, 1, 1)
    assert d["features.7.2.bn3.weight"] == (2048,)
    assert d["representation.conv_dr_block.0.weight"] == (256, 2048, 1, 1)
    assert d["representation.conv_dr_block.1.num_batches_tracked"] == ()
    assert d["classifier.weight"] == (1000, 32896) and d["classifier.bias"] == (1000,)
    assert [k for k, _ in nm_keys][-8:-6] == ["classifier.weight", "classifier.bias"]
    # The released mpncovresnet files: the 3G-Net layout without the AtMp blocks.
    ref = [(k, tuple(s)) for k, s in json.loads(LAYOUT.read_text())["resnet50_3g"] if not k.startswith("AtMp")]
    assert mp_keys == ref
    # Same tensors in all three namings, in the same order.
    assert [s for _, s in layout_of(pre)] == [s for _, s in mp_keys]
    assert dict(layout_of(pre))["features.8.weight"] == (256, 2048, 1, 1)
    assert dict(layout_of(pre))["features.9.running_mean"] == (256,)


def test_isqrt_forward_matches_3g_pieces():
    """iSQRT-COV = same backbone/reduction, no re-weighting, triu (i <= j) vector."""
    z = helpers.golden("resnet18_3g")
    sd3 = seed0_state_dict("resnet18_3g")
    model = ReferenceResNet3G("resnet18", head="isqrt", isqrt_keys="mpncovresnet").eval()
    model.load_state_dict({k: v for k, v in sd3.items() if not k.startswith("AtMp")})
    with torch.no_grad():
        logits, inter = model(torch.from_numpy(z["input_nchw"]), return_intermediates=True)
    assert_close(inter["reduced"].numpy(), z["reduced"], name="reduced")
    assert "reweighted1" not in inter
    red = torch.from_numpy(z["reduced"]).double()
    s = cov_pool(red, eps=0.0)  # fast-MPN-COV's Covpool adds no epsilon
    r = sqrt_newton_schulz(s, 5)
    assert_close(inter["covariance"].numpy(), s.numpy(), name="cov")
    assert_close(inter["sqrt"].numpy(), r.numpy(), name="sqrt")
    iu = np.triu_indices(256)  # row-major i <= j
    v = r.numpy()[:, iu[0], iu[1]]
    assert_close(inter["vector"].numpy(), v, name="vector")
    # 3G order is i >= j row-major; the same symmetric matrix gives a permutation.
    il = np.tril_indices(256)
    assert_close(tril_vec_per_sample(r).numpy(), r.numpy()[:, il[0], il[1]], name="tril")
    w, b = model.fc.weight.detach().double(), model.fc.bias.detach().double()
    assert_close(logits.numpy(), (torch.from_numpy(v) @ w.T + b).numpy(), name="logits")

    # The Newmodel naming computes the same function from renamed weights.
    nm = ReferenceResNet3G("resnet18", num_classes=1000, head="isqrt").eval()
    ren = {}
    names = ["conv1", "bn1", None, None, "layer1", "layer2", "layer3", "layer4"]
    for k, val in model.state_dict().items():
        head, rest = k.split(".", 1)
        if head in names:
            ren[f"features.{names.index(head)}.{rest}"] = val
        elif head == "layer_reduce":
            ren[f"representation.conv_dr_block.0.{rest}"] = val
        elif head == "layer_reduce_bn":
            ren[f"representation.conv_dr_block.1.{rest}"] = val
        else:
            ren[f"classifier.{rest}"] = val
    nm.load_state_dict(ren, strict=True)
    with torch.no_grad():
        assert torch.equal(nm(torch.from_numpy(z["input_nchw"])), logits)


def test_gap_head_is_torchvision_resnet():
    with torch.device("meta"):
        model = ReferenceResNet3G("resnet50", head="gap")
    d = dict(layout_of(model))
    assert sum(p.numel() for p in model.parameters()) == 25_557_032  # torchvision resnet50
    assert d["fc.weight"] == (1000, 2048) and "layer_reduce.weight" not in d
    assert model.layer4[0].conv2.stride == (2, 2)
    small = ReferenceResNet3G("resnet18", num_classes=7, head="gap").eval()
    small.load_state_dict(random_state_dict(small, seed=3))
    with torch.no_grad():
        logits, inter = small(torch.randn(2, 3, 64, 64), return_intermediates=True)
    assert inter["layer4"].shape == (2, 512, 2, 2) and logits.shape == (2, 7)
    assert_close(inter["pooled"].numpy(), inter["layer4"].mean((2, 3)).numpy(), name="pool")


# ---------------------------------------------------------------------- backward
def test_closed_form_backward_functions():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: CovPoolFunction.apply(t, 1e-7), (x,))
    a = torch.randn(2, 6, 9, dtype=torch.float64, generator=g)
    s = (a @ a.transpose(1, 2) / 9 + 0.1 * torch.eye(6, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: SqrtNewtonSchulzFunction.apply(t, 5), (s,))
    # Same values and gradients as plain autograd, also for non-symmetric cotangents.
    ct = torch.randn(2, 6, 6, dtype=torch.float64, generator=g)
    y1 = SqrtNewtonSchulzFunction.apply(s, 5)
    (g1,) = torch.autograd.grad((y1 * ct).sum(), s)
    y2 = sqrt_newton_schulz(s, 5)
    (g2,) = torch.autograd.grad((y2 * ct).sum(), s)
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(g1, g2)


def test_3g_head_gradients_function_vs_autograd():
    """Head gradients (re-weighting blocks, covariance, iSQRT, fc; train-mode BN) agree
    between sqrt_impl='autograd' (the released code) and 'function'."""
    z = helpers.golden("resnet18_3g")
    grads = []
    model = ReferenceResNet3G("resnet18")
    model.train()
    for impl in ("autograd", "function"):
        model.sqrt_impl = impl
        model.load_state_dict(seed0_state_dict("resnet18_3g"))
        model.zero_grad(set_to_none=True)
        x = torch.from_numpy(z["reduced"]).requires_grad_()
        loss = torch.nn.functional.cross_entropy(model.forward_head(x), torch.tensor([1, 2]))
        loss.backward()
        g = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        g["input"] = x.grad
        grads.append(g)
    assert "AtMp1.atmap3.weight" in grads[0] and "fc.weight" in grads[0]
    assert set(grads[0]) == set(grads[1])
    for k in grads[0]:
        assert_close(grads[1][k].numpy(), grads[0][k].numpy(), rtol=1e-3, name=k)
    assert grads[0]["AtMp1.atmap3.weight"].abs().sum() > 0


def test_options():
    with pytest.raises(ValueError, match="resnet50"):
        ReferenceResNet3G("resnet51")
    with pytest.raises(ValueError, match="head"):
        ReferenceResNet3G("resnet18", head="foo")
    m = ReferenceResNet3G("resnet18", num_classes=5, num_blocks=1, num_iters=3, dropout=0.2)
    assert [k for k, _ in m.named_children() if k.startswith("AtMp")] == ["AtMp1"]
    m.load_state_dict(random_state_dict(m, seed=1))
    m.train()
    out = m(torch.randn(2, 3, 32, 32))
    out.sum().backward()  # backward through the whole model
    assert m.conv1.weight.grad.abs().sum() > 0
    m.eval()
    with torch.no_grad():
        out, inter = m(torch.randn(1, 3, 64, 64), return_intermediates=True)
    assert out.shape == (1, 5) and "reweighted2" not in inter
    assert inter["covariance"].shape == (1, 256, 256) and inter["vector"].shape == (1, 32896)


@pytest.mark.parametrize("head,head_fp32", [("3g", False), ("isqrt", False), ("3g", True)])
def test_bf16_autocast_train_step_runs(head, head_fp32):
    """The benchmark's GPU setting (bf16 autocast), exercised on CPU at a tiny size."""
    torch.manual_seed(0)
    m = ReferenceResNet3G("resnet18", num_classes=5, num_blocks=1, head=head, head_fp32=head_fp32)
    m.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, inter = m(torch.randn(2, 3, 32, 32), return_intermediates=True)
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 3]))
    loss.backward()
    first = next(m.parameters())
    assert torch.isfinite(loss) and first.grad.abs().sum() > 0
    if head_fp32:
        assert inter["sqrt"].dtype == torch.float32
