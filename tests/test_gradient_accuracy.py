"""gg_jax's float32 gradients are as accurate as the PyTorch reference's float32 gradients.

Both are measured against the reference (tests/reference/torch_reference.py) run in float64,
with the same weights (`make_state_dict(arch, seed=0)`, classifier cut to `CLASSES` outputs),
the same images and labels, train-mode BatchNorm and the mean cross-entropy. The error of a
group of gradients is the norm of its difference from the float64 gradients over their norm.
Pinned, for resnet18_3g (BasicBlocks) and resnet23_3g (Bottlenecks): gg_jax's float32 error
is at most `FACTOR` times PyTorch float32's for

- the 3G head (`layer_reduce` and the re-weighting blocks `AtMp1..3` together), the
  classifier and the head's input, when head and classifier get the same float32 features:
  the float64 reference's `layer4`, rounded (a failure also lists each block's errors);
- the backbone: its gradients for the same cotangent at `layer4`, with every ReLU of the
  backbone taking the sign pattern of the float64 run (`nn.relu` / `F.relu` replaced by a
  product with that pattern in both float32 runs).

Why not end to end: a train-mode ReLU network is only piecewise smooth. Any float32 forward
pass moves some pre-activations that lie near zero across the kink, a different few for each
implementation and batch, and each such crossing changes the gradients far more than the
rounding of all the operations together (its input gradient is 0 instead of 1). Which of
two float32 implementations crosses more kinks on a given batch is chance, so an end-to-end
comparison measures that chance, not accuracy. Fed the same features, the head's own float32
forward error is small enough to cross no kink here; the backbone's is not, hence its fixed
pattern.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")

from gg_jax import convert, models  # noqa: E402
from tests.reference.reference_weights import make_state_dict  # noqa: E402
from tests.reference.torch_reference import ReferenceResNet3G  # noqa: E402

torch.set_num_threads(2)

SIZE = 64  # images SIZE x SIZE: layer4 is SIZE/16 x SIZE/16
BATCH = 2
CLASSES = 10
FACTOR = 2.0
BACKBONE_MODULES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
#: ReLU calls of the backbone: the stem's, then 2 per BasicBlock (8) or 3 per Bottleneck (7).
BACKBONE_RELUS = {"resnet18": 1 + 2 * 8, "resnet23": 1 + 3 * 7}


@functools.cache
def setup(arch):
    """(state_dict, NHWC images, labels, layer4 cotangent) of `arch`, all fixed."""
    sd = make_state_dict(f"{arch}_3g", seed=0)
    sd["fc.weight"], sd["fc.bias"] = sd["fc.weight"][:CLASSES], sd["fc.bias"][:CLASSES]
    rng = np.random.default_rng(0)
    images = rng.standard_normal((BATCH, SIZE, SIZE, 3)).astype(np.float32)
    labels = rng.integers(0, CLASSES, BATCH)
    channels = 512 if arch == "resnet18" else 2048
    cotangent = rng.standard_normal((BATCH, SIZE // 16, SIZE // 16, channels)).astype(np.float32)
    return sd, images, labels, cotangent


def torch_model(arch, sd, dtype):
    model = ReferenceResNet3G(arch, num_classes=CLASSES)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    return model.to(dtype).train()


def to_nchw(x, dtype):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2))).to(dtype)


def to_nhwc(t):
    return t.detach().double().numpy().transpose(0, 2, 3, 1)


def relative_errors(grads, truth, groups):
    """{group: |grads - truth| / |truth|} over the concatenated gradients of each group."""
    out = {}
    for name, keys in groups.items():
        diff = sum(np.sum((np.asarray(grads[k], np.float64) - truth[k]) ** 2) for k in keys)
        out[name] = float(np.sqrt(diff / sum(np.sum(truth[k] ** 2) for k in keys)))
    return out


def check(errors_jax, errors_torch, asserted):
    """errors_jax[g] <= FACTOR * errors_torch[g] for the groups `asserted`; the message lists all."""
    table = "\n".join(
        f"  {g:14s} gg_jax {e:.2e}  torch float32 {errors_torch[g]:.2e}  ratio {e / errors_torch[g]:.2f}"
        for g, e in errors_jax.items()
    )
    print(table)  # the figures: python -m pytest -s tests/test_gradient_accuracy.py
    bad = [g for g in asserted if not errors_jax[g] <= FACTOR * errors_torch[g]]
    assert not bad, f"gradient error vs float64 above {FACTOR}x PyTorch float32's for {bad}:\n{table}"


def jax_gradients_as_torch(name, variables, params_grads):
    """gg_jax parameter gradients (a subtree of `params`) as a reference-named dict."""
    full = {**jax.tree.map(np.zeros_like, variables["params"]), **jax.tree.map(np.asarray, params_grads)}
    return convert.to_torch({"params": full, "batch_stats": variables["batch_stats"]}, name)


# -------------------------------------------------------------------------- head
def torch_head_gradients(arch, sd, dtype, layer4, labels):
    """Reference head + classifier + loss from `layer4` (NHWC): parameter and input gradients."""
    model = torch_model(arch, sd, dtype)
    x = to_nchw(layer4, dtype).requires_grad_()
    reduced = torch.relu(model.layer_reduce_bn(model.layer_reduce(x)))
    logits = model.forward_head(reduced)
    torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)).backward()
    grads = {k: p.grad.double().numpy() for k, p in model.named_parameters() if p.grad is not None}
    grads["input"] = to_nhwc(x.grad)
    return grads


def jax_head_gradients(arch, sd, layer4, labels):
    name = f"{arch}_3g"
    model = models.create(name, num_classes=CLASSES)
    variables = convert.from_torch(sd, name)
    head, fc = model.head.clone(dtype=jnp.float32), nn.Dense(CLASSES)  # as in models.Classifier

    @jax.jit
    def gradients(params, x):
        def loss(params, x):
            v, _ = head.apply(
                {"params": params["head"], "batch_stats": variables["batch_stats"]["head"]},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            logits = fc.apply({"params": params["fc"]}, v)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        return jax.grad(loss, argnums=(0, 1))(params, x)

    params = {k: variables["params"][k] for k in ("head", "fc")}
    g_params, g_input = gradients(params, jnp.asarray(layer4, jnp.float32))
    grads = jax_gradients_as_torch(name, variables, g_params)
    grads["input"] = np.asarray(g_input)
    return grads


@pytest.mark.parametrize("arch", ["resnet18", "resnet23"])
def test_head_and_classifier_gradients(arch):
    sd, images, labels, _ = setup(arch)
    with torch.no_grad():
        layer4 = torch_model(arch, sd, torch.float64)
        x = to_nchw(images, torch.float64)
        for m in BACKBONE_MODULES:
            x = getattr(layer4, m)(x)
    features = to_nhwc(x).astype(np.float32)  # the same input for the three heads
    truth = torch_head_gradients(arch, sd, torch.float64, features.astype(np.float64), labels)
    keys = list(truth)
    groups = {
        "head": [k for k in keys if k.startswith(("layer_reduce", "AtMp"))],
        "layer_reduce": [k for k in keys if k.startswith("layer_reduce")],
        **{f"AtMp{t}": [k for k in keys if k.startswith(f"AtMp{t}.")] for t in (1, 2, 3)},
        "classifier": [k for k in keys if k.startswith("fc.")],
        "head input": ["input"],
    }
    assert sum(map(len, groups.values())) - len(groups["head"]) == len(keys)
    errors_torch = relative_errors(torch_head_gradients(arch, sd, torch.float32, features, labels), truth, groups)
    errors_jax = relative_errors(jax_head_gradients(arch, sd, features, labels), truth, groups)
    check(errors_jax, errors_torch, ["head", "classifier", "head input"])


# ----------------------------------------------------------------------- backbone
def torch_backbone_gradients(arch, sd, dtype, images, cotangent, pattern, monkeypatch):
    """Reference backbone gradients for `cotangent` at layer4. `pattern`: None records every
    ReLU's sign pattern (returned, NHWC); else a list of patterns that replace the ReLUs."""
    model = torch_model(arch, sd, dtype)
    recorded, replay = [], iter(pattern or ())

    def relu(x, inplace=False):
        if pattern is None:
            recorded.append((to_nhwc(x) > 0).astype(np.float32))
            return torch.relu(x)
        return x * to_nchw(next(replay), dtype)

    with monkeypatch.context() as mp:
        mp.setattr(torch.nn.functional, "relu", relu)
        y = to_nchw(images, dtype)
        for m in BACKBONE_MODULES:
            y = getattr(model, m)(y)
    assert next(replay, None) is None
    (y * to_nchw(cotangent, dtype)).sum().backward()
    grads = {k: p.grad.double().numpy() for k, p in model.named_parameters() if p.grad is not None}
    return grads, recorded


def jax_backbone_gradients(arch, sd, images, cotangent, pattern, monkeypatch):
    name = f"{arch}_3g"
    model = models.create(name, num_classes=CLASSES)
    variables = convert.from_torch(sd, name)
    params = {k: v for k, v in variables["params"].items() if k not in ("head", "fc")}
    stats = {k: v for k, v in variables["batch_stats"].items() if k != "head"}

    @jax.jit
    def gradients(params, x, ct, pattern):
        replay = iter(pattern)

        def forward(params):
            y, _ = model.backbone.apply(
                {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
            )
            return y

        with monkeypatch.context() as mp:
            mp.setattr(nn, "relu", lambda y: y * next(replay))  # traced once, in call order
            y, pull = jax.vjp(forward, params)
        assert next(replay, None) is None and y.shape == ct.shape
        return pull(ct)[0]

    g = gradients(params, jnp.asarray(images), jnp.asarray(cotangent), [jnp.asarray(p) for p in pattern])
    return jax_gradients_as_torch(name, variables, g)


@pytest.mark.parametrize("arch", ["resnet18", "resnet23"])
def test_backbone_gradients(arch, monkeypatch):
    sd, images, _, cotangent = setup(arch)
    run = functools.partial(torch_backbone_gradients, arch, sd, images=images, cotangent=cotangent)
    truth, pattern = run(dtype=torch.float64, pattern=None, monkeypatch=monkeypatch)
    assert len(pattern) == BACKBONE_RELUS[arch]
    groups = {"backbone": list(truth)}
    errors_torch = relative_errors(run(dtype=torch.float32, pattern=pattern, monkeypatch=monkeypatch)[0], truth, groups)
    g = jax_backbone_gradients(arch, sd, images, cotangent, pattern, monkeypatch)
    errors_jax = relative_errors(g, truth, groups)
    check(errors_jax, errors_torch, ["backbone"])
