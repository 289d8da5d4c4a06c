"""gg_jax.convert: PyTorch checkpoints (3G-Net, fast-MPN-COV, torchvision) -> gg_jax.

The PyTorch side is the project's reference implementation (`tests/reference/torch_reference.py`),
whose state_dict keys are those of the real checkpoints (test_torch_reference.py checks
it against the golden files and layout.json).
"""

import functools
import json
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gg_jax import checkpoints, convert, errors, models
from tests import helpers, runs
from tests.helpers import LAYOUT, assert_close
from tests.reference.reference_weights import make_state_dict

torch = pytest.importorskip("torch")
from tests.reference.torch_reference import ReferenceResNet3G, layout_of, random_state_dict  # noqa: E402

torch.set_num_threads(2)

RTOL = 1e-4


def assert_trees_equal(a, b):
    fa = jax.tree_util.tree_flatten_with_path(a)[0]
    fb = jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (path, x), (_, y) in zip(fa, fb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def torch_logits(model, x_nchw):
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(x_nchw)).numpy()


@functools.cache
def _eval_fn(name, num_classes, options):
    model = models.create(name, num_classes=num_classes, **dict(options))
    return jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]))


def jax_apply(name, variables, x_nchw, **options):
    """(logits, intermediates) in eval mode; one compile per model configuration."""
    fn = _eval_fn(name, variables["params"]["fc"]["kernel"].shape[1], tuple(sorted(options.items())))
    logits, state = fn(variables, x_nchw.transpose(0, 2, 3, 1))
    return np.asarray(logits), state["intermediates"]


def jax_logits(name, variables, x_nchw, **options):
    return jax_apply(name, variables, x_nchw, **options)[0]


def to_tensors(state_dict, prefix=""):
    return {prefix + k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}


@pytest.fixture(scope="module")
def x64():
    return np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)


# ------------------------------------------------------------------------------ layout
@pytest.mark.parametrize("arch", json.loads(LAYOUT.read_text()))
def test_torch_layout_is_the_released_layout(arch):
    expected = [(k, tuple(s)) for k, s in json.loads(LAYOUT.read_text())[arch]]
    assert convert.torch_layout(arch, 1000) == expected


@pytest.mark.parametrize("head", sorted(models.HEADS))
def test_to_torch_from_torch_round_trip_every_head(head):
    name = f"resnet18_{head}"
    variables = _numpy_init(name, 7, seed=0)
    exported = convert.to_torch(variables, name)
    assert all(isinstance(v, np.ndarray) for v in exported.values())
    assert [(k, tuple(v.shape)) for k, v in exported.items()] == convert.torch_layout(name, 7)
    result = convert.convert_state_dict(exported, name)
    assert result.convention == convert.default_convention(name) and result.num_classes == 7
    assert_trees_equal(result.variables, variables)


# ------------------------------------------------------------------------ fast-MPN-COV
def test_fast_mpn_cov_isqrt_resnet50_matches_torch_reference(x64):
    ref = ReferenceResNet3G("resnet50", num_classes=100, head="isqrt")  # fast-MPN-COV main.py keys
    state = random_state_dict(ref, seed=2)
    ref.load_state_dict(state, strict=True)
    expected = torch_logits(ref, x64)
    # main.py wraps `features` in DataParallel ("features.module.0.weight"); DDP adds "module.".
    saved = {("module." + k.replace("features.", "features.module.", 1)): v for k, v in state.items()}
    result = convert.convert_state_dict(saved, "resnet50_isqrt")
    assert (result.convention, result.vector_order, result.num_classes) == ("fast_mpn_cov_newmodel", "upper", 100)
    variables = result.variables
    # fast-MPN-COV's covariance adds no ridge: cov_eps=0 reproduces it exactly.
    assert_close(jax_logits("resnet50_isqrt", variables, x64, cov_eps=0.0), expected, name="isqrt logits")

    # Without permuting the classifier's columns (i <= j read as i >= j) the logits differ.
    unpermuted = convert.from_torch(saved, "resnet50_isqrt", vector_order="lower")
    with pytest.raises(AssertionError):
        assert_close(jax_logits("resnet50_isqrt", unpermuted, x64, cov_eps=0.0), expected)

    # The other fast-MPN-COV layouts: the key names of the PyTorch reference, and the same
    # variables back.
    for keys, convention in (
        ("mpncovresnet", "fast_mpn_cov"),
        ("newmodel", "fast_mpn_cov_newmodel"),
        ("newmodel_pretrained", "fast_mpn_cov_newmodel_pretrained"),
    ):
        with torch.device("meta"):
            oracle = layout_of(ReferenceResNet3G("resnet50", 100, head="isqrt", isqrt_keys=keys))
        exported = convert.to_torch(variables, "resnet50_isqrt", convention=convention)
        assert [(k, tuple(v.shape)) for k, v in exported.items()] == oracle
        again = convert.convert_state_dict(exported, "resnet50_isqrt")
        assert again.convention == convention
        assert_trees_equal(again.variables, variables)
    # to_torch's default for *_isqrt is MPNCOVResNet (the released mpncovresnet50 files).
    assert list(convert.to_torch(variables, "resnet50_isqrt")) == list(
        convert.to_torch(variables, "resnet50_isqrt", convention="fast_mpn_cov")
    )


# -------------------------------------------------------------------------- torchvision
@pytest.fixture(scope="module")
def torchvision_resnet50():
    ref = ReferenceResNet3G("resnet50", num_classes=100, head="gap")  # torchvision keys
    state = random_state_dict(ref, seed=3)
    ref.load_state_dict(state, strict=True)
    return ref, state


def test_torchvision_resnet50_into_resnet50_gap(torchvision_resnet50, x64):
    ref, state = torchvision_resnet50
    result = convert.convert_state_dict(state, "resnet50_gap")
    assert result.convention == "torchvision"
    assert_close(jax_logits("resnet50_gap", result.variables, x64), torch_logits(ref, x64), name="gap logits")
    assert list(convert.to_torch(result.variables, "resnet50_gap")) == list(state)


def _numpy_init(name, num_classes, seed, **options):
    """Stand-in for freshly initialised variables (distinct values, no XLA compile)."""
    model = models.create(name, num_classes=num_classes, **options)
    shapes = models.init_variables(model, jax.random.PRNGKey(0), abstract=True)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


def test_torchvision_backbone_into_resnet50_3g(torchvision_resnet50):
    _, state = torchvision_resnet50
    with pytest.raises(convert.CheckpointMismatchError) as e:
        convert.from_torch(state, "resnet50_3g")
    msg = str(e.value)
    for name in ("layer_reduce.weight", "AtMp1.map1.weight", "AtMp3.atmap3.weight", "fc.weight", "backbone_only"):
        assert name in msg

    backbone = convert.from_torch(state, "resnet50_3g", backbone_only=True)
    assert set(backbone["params"]) == {k for k in backbone["params"] if k in ("conv1", "bn1") or k.startswith("layer")}
    init = _numpy_init("resnet50_3g", 200, seed=4)
    merged = convert.merge_backbone(init, backbone)
    full = convert.from_torch(state, "resnet50_gap")
    for col in ("params", "batch_stats"):
        for module, tree in merged[col].items():
            if module in ("head", "fc"):
                assert_trees_equal(tree, init[col][module])  # keeps its init
            else:
                assert_trees_equal(tree, full[col][module])  # = the torchvision weights
    # A backbone of another depth does not fit: named in the error.
    small = convert.from_torch(
        random_state_dict(ReferenceResNet3G("resnet18", head="gap"), 0), "resnet18_3g", backbone_only=True
    )
    with pytest.raises(convert.CheckpointMismatchError, match="layer1_0/conv1/kernel"):
        convert.merge_backbone(init, small)


def test_cli_backbone_only_from_torchvision_resnet18(tmp_path, capsys):
    """torchvision resnet18 weights -> resnet18_3g with a fresh head, via the CLI."""
    tv = ReferenceResNet3G("resnet18", num_classes=1000, head="gap")
    state = random_state_dict(tv, seed=5)
    path = tmp_path / "resnet18-torchvision.pth"
    torch.save(state, path)  # a bare state_dict, as torchvision's model zoo files
    out = tmp_path / "converted"
    assert (
        convert.main(
            [
                "--arch",
                "resnet18_3g",
                "--torch_checkpoint",
                str(path),
                "--out",
                str(out),
                "--backbone_only",
                "--num_classes",
                "10",
            ]
        )
        == 0
    )
    stdout = capsys.readouterr().out
    assert "torchvision" in stdout and "fc.weight" in stdout  # convention; ignored keys
    variables, meta = checkpoints.load_variables(str(out))
    assert meta["model"] == "resnet18_3g" and meta["num_classes"] == 10 and meta["backbone_only"]
    assert meta["model_options"] == {} and "fc.weight" in meta["ignored_keys"]

    # The backbone computes what the PyTorch 3G-Net computes with these backbone weights.
    ref3g = ReferenceResNet3G("resnet18", num_classes=10)
    missing, unexpected = ref3g.load_state_dict(
        {k: v for k, v in state.items() if not k.startswith("fc.")}, strict=False
    )
    assert not unexpected and all(k.startswith(("layer_reduce", "AtMp", "fc")) for k in missing)
    x = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
    ref3g.eval()
    with torch.no_grad():
        _, inter = ref3g(torch.from_numpy(x), return_intermediates=True)
    _, ours = jax_apply("resnet18_3g", variables, x)
    assert_close(np.asarray(ours["layer4"][0]).transpose(0, 3, 1, 2), inter["layer4"].numpy(), name="layer4")
    # The head and classifier are freshly initialised (BN 1/0, running 0/1, PyTorch's linear bound).
    head = variables["params"]["head"]
    np.testing.assert_array_equal(head["reduce"]["layer_reduce_bn"]["scale"], 1.0)
    np.testing.assert_array_equal(variables["batch_stats"]["head"]["reweighting"]["blocks"]["block"]["bn1"]["var"], 1.0)
    fc = variables["params"]["fc"]["kernel"]
    assert fc.shape == (32896, 10) and np.abs(fc).max() <= 1 / np.sqrt(fc.shape[0])


# ----------------------------------------------------------------- .pth files and the CLI
def _released_style(state_dict, epoch=17, arch="resnet18_3g"):
    tensors = to_tensors(state_dict, prefix="module.")
    return {
        "epoch": epoch,
        "arch": arch,
        "state_dict": tensors,
        "best_prec1": torch.tensor(78.5),
        "optimizer": {
            "state": {0: {"momentum_buffer": torch.zeros(3)}},
            "param_groups": [{"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "params": [0]}],
        },
    }


def test_load_torch_checkpoint_released_dict_and_cli(tmp_path):
    arch = "resnet18_3g"
    state = make_state_dict(arch, seed=0, layout=LAYOUT)
    ckpt = _released_style(state)
    path = tmp_path / "3gnet_resnet18.pth.tar"
    torch.save(ckpt, path)
    variables, meta = convert.load_torch_checkpoint(path, arch)
    assert_trees_equal(variables, convert.from_torch(state, arch))
    assert {jnp.dtype(a.dtype) for a in jax.tree.leaves(variables)} == {jnp.dtype(np.float32)}
    assert meta["epoch"] == ckpt["epoch"] and meta["arch"] == ckpt["arch"]
    assert meta["best_prec1"] == pytest.approx(float(ckpt["best_prec1"]))
    assert meta["num_classes"] == state["fc.weight"].shape[0] and meta["convention"] == "3gnet"

    # The CLI writes a directory that load_variables restores, with the golden logits.
    out = tmp_path / "converted"
    assert convert.main(["--arch", arch, "--torch_checkpoint", str(path), "--out", str(out)]) == 0
    restored, rmeta = checkpoints.load_variables(str(out))
    assert rmeta["model"] == arch and rmeta["num_classes"] == meta["num_classes"]
    assert rmeta["source"] == str(path.resolve()) and rmeta["epoch"] == ckpt["epoch"]
    assert_trees_equal(restored, variables)
    z = helpers.golden(arch)
    assert_close(jax_logits(arch, restored, z["input_nchw"]), z["logits_eval"], name="restored logits")
    assert rmeta["model_options"] == {"num_blocks": 3, "reweighting": "3g", "hidden": 64, "reduction_dim": 256}
    # An existing checkpoint is not replaced without --overwrite.
    with pytest.raises(checkpoints.CheckpointExistsError, match="--overwrite"):
        convert.main(["--arch", arch, "--torch_checkpoint", str(path), "--out", str(out)])
    assert convert.main(["--arch", arch, "--torch_checkpoint", str(path), "--out", str(out), "--overwrite"]) == 0


def test_load_bare_state_dict_with_numpy_scalars_and_bf16_tensors(tmp_path):
    arch = "resnet18_3g"
    state = make_state_dict(arch, seed=0, layout=LAYOUT)
    path = tmp_path / "bare.pth"
    torch.save(to_tensors(state), path)
    variables, meta = convert.load_torch_checkpoint(path, arch)
    assert_trees_equal(variables, convert.from_torch(state, arch))
    assert "epoch" not in meta
    # best_prec1 stored as a NumPy scalar (allow-listed, it is only a number).
    ckpt = _released_style(state)
    ckpt["best_prec1"] = np.float64(71.25)
    torch.save(ckpt, path)
    assert convert.load_torch_checkpoint(path, arch)[1]["best_prec1"] == ckpt["best_prec1"]
    # bf16 torch tensors are accepted (widened to float32).
    bf16 = {
        k: torch.from_numpy(v).bfloat16() if v.dtype == np.float32 else torch.from_numpy(v) for k, v in state.items()
    }
    got = convert.from_torch(bf16, arch)
    want = convert.from_torch(
        {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in bf16.items()}, arch
    )
    assert_trees_equal(got, want)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = _released_style(make_state_dict("resnet18_3g", seed=0, layout=LAYOUT))
    ckpt["extra"] = _Evil(marker)
    zip_file = tmp_path / "evil.pth.tar"
    torch.save(ckpt, zip_file)
    legacy_file = tmp_path / "evil_legacy.pth"  # torch's legacy (non-zip) format is pickle protocol 2
    with open(legacy_file, "wb") as f:
        pickle.dump({"state_dict": {}, "extra": _Evil(marker)}, f, protocol=2)
    for path in (zip_file, legacy_file):
        with pytest.raises(convert.UnsafeCheckpointError) as e:
            convert.load_torch_checkpoint(path, "resnet18_3g")
        msg = str(e.value)
        assert str(path) in msg and "arbitrary Python objects" in msg and "state_dict" in msg
        assert not marker.exists()
    # A plain pickle of a newer protocol is refused too (the safe loader does not parse it).
    plain_file = tmp_path / "evil_plain.pkl"
    with open(plain_file, "wb") as f:
        pickle.dump({"state_dict": {}, "extra": _Evil(marker)}, f, protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(ValueError, match="evil_plain.pkl"):
        convert.load_torch_checkpoint(plain_file, "resnet18_3g")
    assert not marker.exists()
    with pytest.raises(convert.UnsafeCheckpointError, match="arbitrary Python objects") as e:
        convert.main(["--arch", "resnet18_3g", "--torch_checkpoint", str(zip_file), "--out", str(tmp_path / "out")])
    assert isinstance(e.value, errors.UserError) and isinstance(e.value, ValueError)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_missing_and_corrupt_files(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(checkpoints.CheckpointNotFoundError, match="nope.pth") as e:
        convert.load_torch_checkpoint(missing, "resnet18_3g")
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, errors.UserError)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    good = tmp_path / "good.pth"
    torch.save(to_tensors(make_state_dict("resnet18_3g", seed=0, layout=LAYOUT)), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for path in (garbage, truncated):
        with pytest.raises(convert.UnreadableCheckpointError, match=path.name) as e:
            convert.load_torch_checkpoint(path, "resnet18_3g")
        assert "not a readable PyTorch checkpoint" in str(e.value)
        assert isinstance(e.value, ValueError) and isinstance(e.value, errors.UserError)
    odd = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], odd)
    with pytest.raises(convert.UnreadableCheckpointError, match="not a state_dict"):
        convert.load_torch_checkpoint(odd, "resnet18_3g")
    nested = tmp_path / "nested.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1), "extra": {"a": torch.zeros(1)}}}, nested)
    with pytest.raises(convert.UnreadableCheckpointError, match="'extra' \\(dict\\)"):
        convert.load_torch_checkpoint(nested, "resnet18_3g")


def test_nonfinite_weights_are_refused_unless_allowed(tmp_path, caplog):
    state = make_state_dict("resnet18_3g", seed=0, layout=LAYOUT)
    weight = state["layer1.0.conv1.weight"].copy()
    weight.flat[:3], weight.flat[3] = np.nan, np.inf
    state["layer1.0.conv1.weight"] = weight
    pth = tmp_path / "diverged.pth"
    torch.save(to_tensors(state), pth)
    args = ["--arch", "resnet18_3g", "--torch_checkpoint", str(pth), "--out", str(tmp_path / "out")]
    with pytest.raises(convert.NonfiniteWeightsError) as e:
        convert.main(args)
    err = str(e.value)
    assert "layer1.0.conv1.weight: 3 NaN, 1 inf" in err and "--allow_nonfinite" in err, err
    assert "\n" not in err and not (tmp_path / "out").exists(), err
    with pytest.raises(convert.NonfiniteWeightsError):
        convert.load_torch_checkpoint(pth, "resnet18_3g", allow_nonfinite=False)
    assert convert.main([*args, "--allow_nonfinite"]) == 0 and checkpoints.is_variables_dir(tmp_path / "out")
    # The library converts them, with a warning that names them.
    with caplog.at_level("WARNING"):
        convert.from_torch(state, "resnet18_3g")
    assert "layer1.0.conv1.weight: 3 NaN, 1 inf" in caplog.text
    assert not convert.convert_state_dict(
        make_state_dict("resnet18_3g", seed=0, layout=LAYOUT), "resnet18_3g"
    ).nonfinite


# ------------------------------------------------------------------------ mismatches
def test_mismatch_errors_list_every_name():
    state = make_state_dict("resnet18_3g", seed=0, layout=LAYOUT)
    bad = {"module." + k: v for k, v in state.items() if k != "layer2.0.bn1.running_var"}
    bad["module.layer9.0.conv1.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    bad["module.AtMp2.map3.weight"] = np.zeros((256, 128, 1, 1), np.float32)
    with pytest.raises(convert.CheckpointMismatchError) as e:
        convert.from_torch(bad, "resnet18_3g")
    msg = str(e.value)
    assert "missing keys (1)" in msg and "layer2.0.bn1.running_var" in msg
    assert "unexpected keys (1)" in msg and "module.layer9.0.conv1.weight" in msg
    assert "shape mismatches (1)" in msg and "module.AtMp2.map3.weight" in msg and "(256, 128, 1, 1)" in msg

    # Fewer re-weighting blocks: named, with the option to pass.
    two = {k: v for k, v in state.items() if not k.startswith("AtMp3.")}
    with pytest.raises(convert.CheckpointMismatchError, match="num_blocks=2") as e:
        convert.from_torch(two, "resnet18_3g")
    assert "AtMp3.map1.weight" in str(e.value)
    variables = convert.from_torch(two, "resnet18_3g", num_blocks=2)
    assert variables["params"]["head"]["reweighting"]["blocks"]["block"]["map1"]["kernel"].shape[0] == 2

    # The number of classes comes from fc; a different explicit one is a named shape error.
    ten = dict(state, **{"fc.weight": state["fc.weight"][:10], "fc.bias": state["fc.bias"][:10]})
    assert convert.from_torch(ten, "resnet18_3g")["params"]["fc"]["kernel"].shape == (32896, 10)
    with pytest.raises(convert.CheckpointMismatchError, match="fc.weight"):
        convert.from_torch(ten, "resnet18_3g", num_classes=365)
    # A 3G-Net checkpoint is not a ResNet-34 one.
    with pytest.raises(convert.CheckpointMismatchError, match="layer1.2.conv1.weight"):
        convert.from_torch(state, "resnet34_3g")


# ------------------------------------------------ model options, depth, what a state_dict is
SMALL_3G = {"num_blocks": 1, "reduction_dim": 16, "hidden": 8}  # the demo model's kind: T = 1, reduced width


def test_cli_model_options_read_from_the_checkpoint_or_given(tmp_path, capsys):
    """A T=1, reduced-width 3G checkpoint (`to_torch` of such a model) converts from the command line,
    and meta.json's model_options rebuild the same model (`checkpoints.load`)."""
    name = "resnet18_3g"
    variables = _numpy_init(name, 10, seed=6, **SMALL_3G)
    pth = tmp_path / "small.pth"
    torch.save(to_tensors(convert.to_torch(variables, name, **SMALL_3G)), pth)
    args = ["--arch", name, "--torch_checkpoint", str(pth), "--out"]
    assert convert.main([*args, str(tmp_path / "read")]) == 0
    assert "(read from the checkpoint: num_blocks, reweighting, hidden, reduction_dim)" in capsys.readouterr().out
    model, restored, meta = checkpoints.load(str(tmp_path / "read"))
    assert meta["model_options"] == {**SMALL_3G, "reweighting": "3g"}
    assert (model.head.num_blocks, model.head.reduction_dim, model.head.hidden) == (1, 16, 8)
    assert_trees_equal(restored, variables)

    # Given as flags, with options that change no tensor: recorded as given, typed.
    given = ["--num_blocks", "1", "--reduction_dim", "16", "--hidden", "8", "--last_stride", "2", "--cov_eps", "0.0"]
    assert convert.main([*args, str(tmp_path / "given"), *given, "--lower_triangle", "false"]) == 0
    assert checkpoints.load_variables(str(tmp_path / "given"))[1]["model_options"] == {
        **SMALL_3G,
        "reweighting": "3g",
        "last_stride": 2,
        "cov_eps": 0.0,
        "lower_triangle": False,
    }
    # A flag the checkpoint contradicts: the mismatch names the value to pass.
    with pytest.raises(convert.CheckpointMismatchError, match=r"pass num_blocks=1 \(--num_blocks 1\)"):
        convert.main([*args, str(tmp_path / "wrong"), "--num_blocks", "2"])
    # An option of another model is a usage error: one `error:` line, exit status 1.
    with pytest.raises(SystemExit) as e:
        convert.main(["--arch", "resnet18_gap", "--torch_checkpoint", str(pth), "--out", "x", "--num_blocks", "1"])
    assert e.value.code == 1 and "error: --num_blocks: not an option of resnet18_gap" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, options",
    [
        ("resnet18_3g", SMALL_3G),
        ("resnet18_3g", {"num_blocks": 2, "reweighting": "urm_v2"}),
        ("resnet18_3g", {"reweighting": "urm_v1"}),
        ("resnet18_isqrt", {"reduction_dim": 32}),
    ],
)
def test_head_options_are_named_or_inferred(name, options):
    state = make_state_dict(layout=convert.torch_layout(name, 10, **options))
    with pytest.raises(convert.CheckpointMismatchError) as e:
        convert.from_torch(state, name)
    for option, value in options.items():
        assert f"pass {option}={value!r} (--{option} {value})" in str(e.value)
    result = convert.convert_state_dict(state, name, infer_options=True)
    assert {k: result.options[k] for k in options} == options
    assert_trees_equal(result.variables, convert.from_torch(state, name, **options))


def test_resnet_depth_and_non_resnets_are_named(torchvision_resnet50):
    resnet18 = make_state_dict("resnet18_3g", seed=0, layout=LAYOUT)
    with pytest.raises(convert.CheckpointMismatchError) as e:
        convert.from_torch(resnet18, "resnet50_3g")
    hints = str(e.value).split("Hints: ")[1]
    assert hints == "this is a ResNet-18 (BasicBlocks 2,2,2,2) checkpoint; convert it with --arch resnet18_3g.", hints
    # A torchvision ResNet-50 backbone for a ResNet-18: the depth, and the torchvision hint without backbone_only.
    _, resnet50 = torchvision_resnet50
    with pytest.raises(convert.CheckpointMismatchError) as e:
        convert.from_torch(resnet50, "resnet18_3g", backbone_only=True)
    assert "this is a ResNet-50 (Bottlenecks 3,4,6,3) checkpoint; convert it with --arch resnet50_3g" in str(e.value)
    with pytest.raises(convert.CheckpointMismatchError) as e:
        convert.from_torch(resnet50, "resnet18_3g")
    assert "--arch resnet50_3g" in str(e.value) and "backbone_only" in str(e.value)
    # A depth no backbone has.
    odd = {k: v for k, v in resnet18.items() if not k.startswith("layer3.1.")}
    with pytest.raises(convert.CheckpointMismatchError, match=r"a ResNet of BasicBlocks 2,2,1,2, which no gg_jax"):
        convert.from_torch(odd, "resnet18_3g")
    # No ResNet at all: said, with its keys, and not called a torchvision ResNet.
    mlp = {"fc1.weight": np.ones((8, 4), np.float32), "fc1.bias": np.ones(8, np.float32)}
    mlp |= {"fc2.weight": np.ones((3, 8), np.float32), "fc2.bias": np.ones(3, np.float32)}
    for kwargs in ({}, {"backbone_only": True}):
        with pytest.raises(convert.CheckpointMismatchError) as e:
            convert.from_torch(mlp, "resnet18_3g", **kwargs)
        msg = str(e.value)
        assert "not a ResNet state dict: its keys are fc1.weight, fc1.bias, fc2.weight, fc2.bias." in msg, msg
        assert "torchvision ResNet" not in msg and "\n" not in msg


def test_torch_is_not_needed(tmp_path):
    """gg_jax, gg_jax.models and from_torch work with PyTorch made unimportable."""
    code = f"""
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import gg_jax, gg_jax.models, gg_jax.convert, gg_jax.layers, gg_jax.checkpoints, gg_jax.errors
from tests.reference.reference_weights import make_state_dict
v = gg_jax.convert.from_torch(make_state_dict("resnet18_3g", 0, layout={str(LAYOUT)!r}), "resnet18_3g")
assert v["params"]["fc"]["kernel"].shape == (32896, 1000)
try:
    gg_jax.convert.load_torch_checkpoint({str(LAYOUT)!r}, "resnet18_3g")
except gg_jax.errors.MissingDependencyError as e:
    assert "needs PyTorch" in str(e) and isinstance(e, ImportError), e
else:
    raise SystemExit("load_torch_checkpoint worked without torch")
print("ok")
"""
    proc = runs.run(["-c", code], dict(os.environ), check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_module_entry_point():
    proc = runs.run(["-m", "gg_jax.convert", "--help"], dict(os.environ), check=False)
    assert proc.returncode == 0 and "--torch_checkpoint" in proc.stdout and "resnet50_3g" in proc.stdout
    proc = runs.run(
        ["-m", "gg_jax.convert", "--arch", "resnet50_3x", "--torch_checkpoint", "x.pth", "--out", "y"],
        dict(os.environ),
        check=False,
    )
    assert proc.returncode == 1 and "resnet50_3g" in proc.stderr  # unknown name: lists the valid ones


def test_module_entry_point_errors_are_one_line(tmp_path):
    """A missing or unsafe file: one `error:` line, no traceback, exit status 1 (every error of
    `load_torch_checkpoint` is a `UserError`, which `cli.run_tool` prints so: test_missing_and_corrupt_files)."""
    marker = tmp_path / "pwned"
    unsafe = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "extra": _Evil(marker)}, unsafe)
    cases = [(tmp_path / "nope.pth", "does not exist"), (unsafe, "arbitrary Python")]
    for path, expected in cases:
        args = ["-m", "gg_jax.convert", "--arch=resnet18_3g", f"--torch_checkpoint={path}", f"--out={tmp_path / 'o'}"]
        proc = runs.run(args, dict(os.environ), check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        errors_shown = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors_shown) == 1 and expected in errors_shown[0] and str(path) in errors_shown[0], proc.stderr
    assert not marker.exists() and not (tmp_path / "o").exists()
