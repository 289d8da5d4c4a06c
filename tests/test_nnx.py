"""gg_jax.nnx: the heads of gg_jax.layers as Flax NNX modules.

Every NNX head is checked against its linen head with the same (random, non-trivial)
variables copied across: outputs in eval and training mode, and the running averages a
training-mode call leaves behind. A small NNX CNN with the 3G head then trains under
`nnx.jit` with `nnx.Optimizer`. Shapes are tiny: compiling is the cost here, so the
comparisons compile one program per head at XLA:CPU backend optimisation level 0
(the NNX and the linen head inside the same program, compiled alike).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import gg_jax.nnx as gg_nnx
from gg_jax import layers, models
from gg_jax.data import digits

FAST_COMPILE = {"xla_backend_optimization_level": 0}

# (class name, options, in_features, input [H, W]). Every head with a BatchNorm gets one
# here, so that training mode differs from eval mode.
HEADS = [
    ("GeneralizedGaussianCovariance", dict(reduction_dim=4, num_blocks=1, hidden=3), 6, (3, 4)),
    ("CovariancePooling", dict(method="isqrt", num_iters=3, reduction_dim=3), 5, (3, 3)),
    ("BilinearPooling", dict(), 3, (3, 3)),
    ("GaussianEmbedding", dict(sqrt_method="eigh"), 3, (3, 3)),
    ("GlobalAveragePooling", dict(reduction_dim=3), 5, (2, 3)),
    ("ChannelReduction", dict(features=3), 5, (2, 2)),
    ("ReweightingBlock", dict(hidden=3), 4, (3, 3)),
    ("UnrolledReweighting", dict(num_blocks=2, hidden=3, reweighting="urm_v2"), 4, (3, 3)),
]
# Linen modules without an `in_features` field (the NNX constructor checks the width itself).
NO_IN_FEATURES = ("ChannelReduction", "ReweightingBlock", "UnrolledReweighting")


def random_like(variables, seed):
    """Random values of the variables' shapes: normal params and means, positive variances."""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
    values = [
        rng.uniform(0.5, 2.0, np.shape(leaf))
        if jax.tree_util.keystr(path).endswith("['var']")
        # Scaled to keep the re-weighting's products of BN outputs of order one.
        else rng.normal(0.0, 0.5, np.shape(leaf))
        for path, leaf in leaves
    ]
    return jax.tree_util.tree_unflatten(treedef, [np.asarray(v, np.float32) for v in values])


def max_abs_diff(a, b):
    """Largest |a - b| over the leaves of two trees of one structure (0 for trees without leaves)."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b))
    return max(
        (float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) for x, y in pairs), default=0.0
    )


@pytest.mark.parametrize("name,options,in_features,hw", HEADS, ids=[f"{h[0]}-{i}" for i, h in enumerate(HEADS)])
def test_nnx_head_gives_the_linen_heads_numbers(name, options, in_features, hw):
    head = getattr(gg_nnx, name)(in_features=in_features, rngs=nnx.Rngs(0), **options)
    linen_head = getattr(layers, name)(**options, **({} if name in NO_IN_FEATURES else {"in_features": in_features}))
    assert head.linen_module == linen_head
    x = jax.random.normal(jax.random.PRNGKey(1), (3, *hw, in_features))
    inputs = (x, jax.random.normal(jax.random.PRNGKey(2), x.shape)) if name == "ReweightingBlock" else (x,)

    # The constructor created the linen head's variables: names, collections, shapes, dtypes.
    expected = jax.eval_shape(lambda: linen_head.init(jax.random.PRNGKey(0), *inputs, train=False))
    shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), dict(tree))  # noqa: E731
    assert shapes(head.linen_variables()) == shapes(expected)
    assert set(expected) <= {"params", "batch_stats"}

    # The same variables in both: random, so that every BatchNorm statistic matters.
    variables = random_like(head.linen_variables(), seed=3)
    head.load_linen_variables(variables)
    assert max_abs_diff(head.linen_variables(), variables) == 0.0
    graphdef, state = nnx.split(head)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def run(state, variables, inputs):
        nnx_head = nnx.merge(graphdef, state)
        nnx_head.eval()
        nnx_eval = nnx_head(*inputs)
        nnx_head.train()
        nnx_train = nnx_head(*inputs)
        linen_eval = linen_head.apply(variables, *inputs, train=False)
        linen_train, updates = linen_head.apply(variables, *inputs, train=True, mutable=["batch_stats"])
        return (nnx_eval, nnx_train, nnx.state(nnx_head)), (linen_eval, linen_train, updates)

    (nnx_eval, nnx_train, new_state), (linen_eval, linen_train, updates) = run(state, variables, inputs)
    nnx.update(head, new_state)
    scale = float(np.max(np.abs(linen_eval)))
    for got, want in ((nnx_eval, linen_eval), (nnx_train, linen_train)):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert np.all(np.isfinite(want)) and scale > 0
        assert max_abs_diff(got, want) <= 1e-6 * max(scale, float(np.max(np.abs(want))))
    after = head.linen_variables()
    stats_diff = max_abs_diff(after.get("batch_stats", {}), updates.get("batch_stats", {}))
    print(
        f"NNX vs linen, {name} {options}: max abs diff eval {max_abs_diff(nnx_eval, linen_eval):.3g}, "
        f"train {max_abs_diff(nnx_train, linen_train):.3g}, running averages {stats_diff:.3g}; "
        f"max |eval output| {scale:.3g}"
    )
    assert max_abs_diff(after.get("params", {}), variables.get("params", {})) == 0.0  # Calls never change params.
    if "batch_stats" in variables:
        # Training mode used batch statistics and moved the running averages as linen does.
        assert max_abs_diff(nnx_train, nnx_eval) > 1e-3 * scale
        assert max_abs_diff(after["batch_stats"], variables["batch_stats"]) > 1e-3
        assert stats_diff <= 1e-6


def test_constructor_and_call_errors_say_what_to_do():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['reduction'\].*reduction_dim"):
        gg_nnx.GeneralizedGaussianCovariance(in_features=8, reduction=4, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"rngs must be an nnx.Rngs \(e.g. rngs=nnx.Rngs\(0\)\)"):
        gg_nnx.GeneralizedGaussianCovariance(in_features=8, rngs=0)
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        gg_nnx.CovariancePooling(in_features=0, rngs=nnx.Rngs(0))
    head = gg_nnx.CovariancePooling(in_features=4, method="plain", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="configured for 4 input channels but got 5"):
        head(jnp.ones((2, 3, 3, 5)))
    with pytest.raises(ValueError, match="NHWC"):
        head(jnp.ones((2, 9, 4)))
    block = gg_nnx.ChannelReduction(in_features=4, features=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="configured for 4 input channels"):
        block(jnp.ones((1, 2, 2, 3)))
    variables = block.linen_variables()
    with pytest.raises(ValueError, match=r"missing: \['batch_stats/layer_reduce_bn/mean'"):
        block.load_linen_variables({"params": variables["params"]})
    wrong = jax.tree.map(lambda a: np.zeros((*a.shape[:-1], 3), a.dtype), variables)
    with pytest.raises(ValueError, match="has shape"):
        block.load_linen_variables(wrong)
    # Modes: nnx.view gives a copy in the other mode, the original is unchanged.
    assert block.use_running_average is False
    assert nnx.view(block, use_running_average=True).use_running_average is True
    assert block.use_running_average is False


def test_eager_calls_update_the_running_averages_in_training_mode_only():
    block = gg_nnx.ChannelReduction(in_features=4, features=2, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 3, 4)) + 1.0
    start = block.linen_variables()["batch_stats"]
    block.eval()
    block(x)
    assert max_abs_diff(block.linen_variables()["batch_stats"], start) == 0.0
    block.train()
    block(x)
    moved = block.linen_variables()["batch_stats"]
    assert max_abs_diff(moved, start) > 1e-3
    # As linen: running = 0.9 running + 0.1 batch (initial mean 0).
    _, updates = block.linen_module.apply(
        {"params": block.linen_variables()["params"], "batch_stats": start}, x, train=True, mutable=["batch_stats"]
    )
    assert max_abs_diff(moved, updates["batch_stats"]) <= 1e-6


def test_nnx_head_loads_the_head_of_a_gg_jax_model():
    """The head variables of `models.create(...)` (and of converted checkpoints) fit the NNX head."""
    model = models.create("resnet18_3g", num_classes=3, reduction_dim=8, num_blocks=1)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))
    variables = random_like({"params": shapes["params"]["head"], "batch_stats": shapes["batch_stats"]["head"]}, seed=0)
    head = gg_nnx.GeneralizedGaussianCovariance(in_features=512, reduction_dim=8, num_blocks=1, rngs=nnx.Rngs(0))
    head.load_linen_variables(variables)
    assert max_abs_diff(head.linen_variables(), variables) == 0.0


def build_fast(constructor):
    """`constructor()` (an NNX model) built in one program at backend optimisation level 0.

    Eagerly, every initialiser of the nnx layers compiles on its own, and XLA:CPU spends
    long optimising random-number code that runs once.
    """
    graphdef, _ = nnx.split(nnx.eval_shape(constructor))
    return nnx.merge(graphdef, jax.jit(lambda: nnx.state(constructor()), compiler_options=FAST_COMPILE)())


class SmallNet(nnx.Module):
    """conv -> BN -> ReLU -> strided conv -> ReLU -> 3G head -> linear, on [B, 16, 16, 3]."""

    def __init__(self, num_classes: int, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, (3, 3), strides=(2, 2), rngs=rngs)
        self.head = gg_nnx.GeneralizedGaussianCovariance(
            in_features=16, reduction_dim=8, num_blocks=1, hidden=8, rngs=rngs
        )
        self.fc = nnx.Linear(8 * 9 // 2, num_classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.conv2(x))
        return self.fc(self.head(x))


def test_small_nnx_cnn_with_the_3g_head_trains():
    images, labels = digits.load("train")
    images, labels = images[:64], labels[:64]
    x = np.repeat(np.repeat(images.astype(np.float32) / 255.0, 2, axis=1), 2, axis=2)  # 8x8 -> 16x16
    x = jnp.asarray(np.repeat(x[..., None], 3, axis=-1) - 0.5)
    y = jnp.asarray(labels)

    model = build_fast(lambda: SmallNet(10, rngs=nnx.Rngs(0)))
    optimizer = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        return loss, finite

    stats = lambda: jax.tree.map(np.asarray, nnx.state(model.head, nnx.BatchStat))  # noqa: E731
    stats_before = stats()
    model.train()
    losses = []
    for _ in range(60):
        loss, finite = train_step(model, optimizer, x, y)
        assert bool(finite), f"non-finite gradient at step {len(losses)}"
        losses.append(float(loss))
    print(f"NNX CNN with the 3G head, loss over {len(losses)} steps: " + " ".join(f"{v:.3f}" for v in losses))
    assert np.all(np.isfinite(losses))
    # The first ~20 steps sit near ln 10 = 2.30, where float32 rounding of another instruction
    # set (XLA_FLAGS=--xla_cpu_max_isa=AVX2 / SSE4_2, or AVX-512) moves the curve by +-0.1;
    # after 60 steps the mean of the last 5 losses was 0.002-0.26 (initial seeds 0-4, those
    # three settings), its steps' noise +-0.1: bound it at 0.3x the initial loss (0.69).
    assert np.mean(losses[-5:]) < 0.3 * losses[0], losses
    assert max_abs_diff(stats(), stats_before) > 0  # The head's running averages were updated.
    # Eval mode: running averages; the trained model does better than chance (0.1) on its
    # batch (0.59-1.0 in the runs above, running averages lagging the last steps).
    model.eval()
    stats_trained = stats()
    logits = nnx.jit(lambda model, x: model(x))(model, x)
    assert max_abs_diff(stats(), stats_trained) == 0.0
    assert np.mean(np.argmax(np.asarray(logits), -1) == labels) > 0.3
