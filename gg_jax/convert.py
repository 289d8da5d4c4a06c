"""PyTorch checkpoints <-> gg_jax variables.

Converts the released 3G-Net checkpoints, fast-MPN-COV's iSQRT-COV ResNets and
torchvision ResNets into the variables of `gg_jax.models.create(name, ...)`:

    from gg_jax import convert, models
    variables, meta = convert.load_torch_checkpoint("3gnet_resnet50.pth.tar", "resnet50_3g")
    model = models.create("resnet50_3g", num_classes=meta["num_classes"])
    logits = model.apply(variables, images_nhwc, train=False)

    # state_dicts already in memory (NumPy arrays or torch tensors; torch not needed):
    variables = convert.from_torch(state_dict, "resnet50_3g")

    # fine-tuning from a torchvision (or any) ResNet: backbone only, new head/classifier
    variables = model.init(rng, images, train=False)
    variables = convert.merge_backbone(variables, convert.from_torch(tv_state_dict, "resnet50_3g",
                                                                   backbone_only=True))

Command line (writes a directory that `gg_jax.variables_io.load_variables` reads, as
training's `init_from` and evaluation's `--checkpoint` do):

    python -m gg_jax.convert --arch resnet50_3g --torch_checkpoint FILE --out DIR [--overwrite]

Key conventions (detected automatically, `detect_convention`):
  "3gnet"        the released 3G-Net: conv1 bn1 layer1..4 layer_reduce layer_reduce_bn
                 AtMp1..T fc; vector order i >= j (= ours).
  "fast_mpn_cov" fast-MPN-COV's `MPNCOVResNet` (its released mpncovresnet50/101 files):
                 conv1 ... layer4 layer_reduce layer_reduce_bn fc; vector order i <= j.
  "fast_mpn_cov_newmodel" / "fast_mpn_cov_newmodel_pretrained": fast-MPN-COV's
                 `main.py` models: features.0/1/4..7 (+ features.8/9), representation.
                 conv_dr_block.0/1, classifier; vector order i <= j.
  "torchvision"  torchvision ResNet: conv1 bn1 layer1..4 fc (2048 or 512 inputs).
  "gg_jax"       our own names (same style) for heads without a PyTorch original
                 (mpncov, cov, bcnn, g2de); vector order i >= j.
DataParallel's `module.` (also fast-MPN-COV's `features.module.`) is dropped.
fast-MPN-COV stores the vector `S[i, j], i <= j`; ours is `i >= j` (both row-major), so
the classifier's input rows are permuted and the result is an ordinary `resnet50_isqrt`
with the default `lower_triangle=True`.

Transforms: conv OIHW -> HWIO; linear [out, in] -> [in, out]; BatchNorm weight, bias,
running_mean, running_var -> scale, bias, mean, var (`num_batches_tracked` is ignored);
`AtMp1..T` are stacked on the leading (nn.scan) axis of `head/reweighting/blocks/block`.

Only `load_torch_checkpoint` (reading `.pth` files) needs PyTorch; it is imported there.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import math
import numbers
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flax import traverse_util

from gg_jax.checkpoints import variables as variables_io
from gg_jax.checkpoints.variables import CheckpointMismatchError

__all__ = [
    "CONVENTIONS",
    "CheckpointMismatchError",
    "UnsafeCheckpointError",
    "ConversionResult",
    "convert_state_dict",
    "detect_convention",
    "from_torch",
    "to_torch",
    "merge_backbone",
    "torch_layout",
    "load_torch_checkpoint",
    "main",
]

CONVENTIONS = (
    "3gnet",
    "fast_mpn_cov",
    "fast_mpn_cov_newmodel",
    "fast_mpn_cov_newmodel_pretrained",
    "torchvision",
    "gg_jax",
)
_UPPER_ORDER_CONVENTIONS = ("fast_mpn_cov", "fast_mpn_cov_newmodel", "fast_mpn_cov_newmodel_pretrained")

_BLOCK_ORDER = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample_0", "downsample_1")
_ATMP_ORDER = (
    "map1",
    "bn1",
    "map2",
    "bn2",
    "map21",
    "bn21",
    "map3",
    "bn3",
    "map4",
    "bn4",
    "atmap1",
    "bnat1",
    "atmap2",
    "atmap3",
)
_SCAN_PATH = ("head", "reweighting", "blocks", "block")
_BN_LEAVES = (
    ("params", "scale", "weight"),
    ("params", "bias", "bias"),
    ("batch_stats", "mean", "running_mean"),
    ("batch_stats", "var", "running_var"),
)


class UnsafeCheckpointError(ValueError):
    """The file needs arbitrary Python objects to be unpickled; we refuse to execute it."""


# ----------------------------------------------------------------------------- layout
@dataclasses.dataclass(frozen=True)
class _Entry:
    """One PyTorch tensor (canonical 3G-Net name) and where it lives in our variables."""

    key: str  # canonical (3G-Net style) PyTorch key
    torch_shape: tuple[int, ...]
    collection: str  # "params" or "batch_stats"
    path: tuple[str, ...]  # path inside the collection, leaf included
    kind: str  # "conv", "linear", "vector" (1-d, copied)
    scan_index: int | None  # index on the nn.scan axis, or None


def _module_sort_key(path: tuple[str, ...]):
    head = path[0]
    if head == "conv1":
        return (0,)
    if head == "bn1":
        return (1,)
    m = re.fullmatch(r"layer(\d+)_(\d+)", head)
    if m:
        sub = path[1] if len(path) > 1 else ""
        order = _BLOCK_ORDER.index(sub) if sub in _BLOCK_ORDER else len(_BLOCK_ORDER)
        return (2, int(m.group(1)), int(m.group(2)), order, path)
    if path[:3] == ("head", "reduce", "layer_reduce"):
        return (3, 0)
    if path[:3] == ("head", "reduce", "layer_reduce_bn"):
        return (3, 1)
    if path[:4] == _SCAN_PATH:
        return (4, 0)  # expanded per block later
    if head == "head":
        return (5, path)
    if head == "fc":
        return (7,)
    return (6, path)


def _canonical_module(path: tuple[str, ...], t: int | None = None) -> str:
    """Our module path -> its PyTorch module name in the 3G-Net convention."""
    m = re.fullmatch(r"layer(\d+)_(\d+)", path[0])
    if m:
        rest = [p.replace("downsample_", "downsample.") for p in path[1:]]
        return ".".join([f"layer{m.group(1)}.{m.group(2)}"] + rest)
    if path[:2] == ("head", "reduce") and len(path) == 3:
        return path[2]
    if path[:4] == _SCAN_PATH:
        return ".".join([f"AtMp{t + 1}"] + list(path[4:]))
    return ".".join(path)


def _backbone_module(path: tuple[str, ...]) -> bool:
    return path[0] in ("conv1", "bn1") or re.fullmatch(r"layer\d+_\d+", path[0]) is not None


def _freeze_options(options):
    return tuple(sorted(options.items()))


@functools.lru_cache(maxsize=64)
def _variable_shapes(name: str, num_classes: int, frozen_options) -> dict[str, dict[tuple[str, ...], tuple[int, ...]]]:
    """Shapes of `create(name, ...)`'s variables, without allocating them (jax.eval_shape)."""
    import jax
    import jax.numpy as jnp

    from gg_jax import models

    model = models.create(name, num_classes=num_classes, **dict(frozen_options))
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0), images)
    return {
        col: {p: tuple(s.shape) for p, s in traverse_util.flatten_dict(shapes.get(col, {})).items()}
        for col in ("params", "batch_stats")
    }


def _check_resnet(name: str) -> None:
    """The PyTorch checkpoints converted here are ResNets; other backbones have no original."""
    from gg_jax import models

    backbone, _ = models.parse_name(name)
    if not backbone.startswith("resnet"):
        raise ValueError(
            f"gg_jax.convert reads and writes ResNet checkpoints (the reference 3G-Net, fast-MPN-COV, "
            f"torchvision); {name!r} has the {backbone} backbone, which has no PyTorch checkpoint layout here."
        )


@functools.lru_cache(maxsize=64)
def _layout(name: str, num_classes: int, frozen_options) -> tuple[_Entry, ...]:
    _check_resnet(name)
    shapes = _variable_shapes(name, num_classes, frozen_options)
    modules: dict[tuple[str, ...], dict[str, dict[str, tuple[int, ...]]]] = {}
    for col in ("params", "batch_stats"):
        for path, shape in shapes[col].items():
            modules.setdefault(path[:-1], {}).setdefault(col, {})[path[-1]] = shape
    entries: list[_Entry] = []

    def add_module(mod, leaves, t):
        params = leaves.get("params", {})
        stats = leaves.get("batch_stats", {})
        scanned = t is not None
        per = (lambda s: s[1:]) if scanned else (lambda s: s)
        torch_mod = _canonical_module(mod, t)
        if "kernel" in params:
            k = per(params["kernel"])
            if len(k) == 4:  # HWIO -> OIHW
                entries.append(
                    _Entry(f"{torch_mod}.weight", (k[3], k[2], k[0], k[1]), "params", mod + ("kernel",), "conv", t)
                )
            elif len(k) == 2:  # [in, out] -> [out, in]
                entries.append(_Entry(f"{torch_mod}.weight", (k[1], k[0]), "params", mod + ("kernel",), "linear", t))
            else:
                raise NotImplementedError(f"no PyTorch equivalent for kernel {'/'.join(mod)} of shape {k}")
            if "bias" in params:
                entries.append(_Entry(f"{torch_mod}.bias", per(params["bias"]), "params", mod + ("bias",), "vector", t))
        elif "scale" in params:
            for col, leaf, tleaf in _BN_LEAVES:
                src = params if col == "params" else stats
                entries.append(_Entry(f"{torch_mod}.{tleaf}", per(src[leaf]), col, mod + (leaf,), "vector", t))
        else:
            raise NotImplementedError(f"no PyTorch equivalent for module {'/'.join(mod)} ({sorted(params)})")

    for mod in sorted(modules, key=_module_sort_key):
        if mod[:4] == _SCAN_PATH:
            continue
        add_module(mod, modules[mod], None)
    scanned = {m: v for m, v in modules.items() if m[:4] == _SCAN_PATH}
    if scanned:
        num_blocks = next(iter(next(iter(scanned.values()))["params"].values()))[0]
        blocks = []
        for t in range(num_blocks):
            for mod in sorted(scanned, key=lambda m: (_ATMP_ORDER.index(m[4]) if m[4] in _ATMP_ORDER else 99, m)):
                before = len(entries)
                add_module(mod, scanned[mod], t)
                blocks.extend(entries[before:])
                del entries[before:]
        # Re-weighting blocks come right after the reduction (reference order).
        pos = max((i + 1 for i, e in enumerate(entries) if e.path[:2] == ("head", "reduce")), default=len(entries))
        entries[pos:pos] = blocks
    return tuple(entries)


def _vector_head(name: str) -> bool:
    from gg_jax import models

    return "lower_triangle" in models.options(name)


def _tri_size(d: int) -> int | None:
    c = int(round((math.sqrt(8 * d + 1) - 1) / 2))
    return c if c * (c + 1) // 2 == d else None


@functools.lru_cache(maxsize=8)
def _upper_to_lower(c: int) -> np.ndarray:
    """perm with lower_vec = upper_vec[perm] for a symmetric c x c matrix.

    lower: S[i, j], i >= j, row-major; upper: S[i, j], i <= j, row-major (fast-MPN-COV).
    """
    rows, cols = np.tril_indices(c)
    upper_pos = np.full(c * c, -1, np.int64)
    ur, uc = np.triu_indices(c)
    upper_pos[ur * c + uc] = np.arange(ur.size)
    perm = upper_pos[cols * c + rows]  # (i, j) with i >= j is (j, i) in the upper triangle
    assert (perm >= 0).all()
    return perm


# ------------------------------------------------------------------------ key renaming
def _newmodel_rename(pretrained: bool):
    """canonical prefix -> fast-MPN-COV Newmodel prefix."""
    table = [("conv1.", "features.0."), ("bn1.", "features.1.")]
    table += [(f"layer{s}.", f"features.{3 + s}.") for s in range(1, 5)]
    if pretrained:
        table += [("layer_reduce.", "features.8."), ("layer_reduce_bn.", "features.9.")]
    else:
        table += [
            ("layer_reduce.", "representation.conv_dr_block.0."),
            ("layer_reduce_bn.", "representation.conv_dr_block.1."),
        ]
    table += [("fc.", "classifier.")]
    return table


def _rename(key: str, table, reverse: bool) -> str:
    for canon, ext in table:
        a, b = (ext, canon) if reverse else (canon, ext)
        if key.startswith(a):
            return b + key[len(a) :]
    return key


def _to_convention(key: str, convention: str) -> str:
    if convention == "fast_mpn_cov_newmodel":
        return _rename(key, _newmodel_rename(False), reverse=False)
    if convention == "fast_mpn_cov_newmodel_pretrained":
        return _rename(key, _newmodel_rename(True), reverse=False)
    return key


def _from_convention(key: str, convention: str) -> str:
    if convention == "fast_mpn_cov_newmodel":
        return _rename(key, _newmodel_rename(False), reverse=True)
    if convention == "fast_mpn_cov_newmodel_pretrained":
        return _rename(key, _newmodel_rename(True), reverse=True)
    return key


def _strip_wrappers(keys: Sequence[str]) -> dict[str, str]:
    """external key -> key without DataParallel's `module.` components."""
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    dups = []
    for k in keys:
        if not isinstance(k, str):
            raise TypeError(f"state_dict keys must be strings, got {k!r} ({type(k).__name__}).")
        s = ".".join(p for p in k.split(".") if p != "module")
        if s in seen:
            dups.append(f"{seen[s]!r} and {k!r}")
        seen[s] = k
        out[k] = s
    if dups:
        raise CheckpointMismatchError(
            "Keys collide once DataParallel's 'module.' prefix is removed: "
            + "; ".join(dups)
            + ". Pass a single model's state_dict."
        )
    return out


def detect_convention(state_dict: Mapping[str, Any], name: str) -> str:
    """Which naming the state_dict uses (one of `CONVENTIONS`) for model `name`."""
    from gg_jax import models

    _, head = models.parse_name(name)
    keys = set(_strip_wrappers(list(state_dict)).values())
    if any(k.startswith(("features.", "representation.", "classifier.")) for k in keys):
        return (
            "fast_mpn_cov_newmodel_pretrained"
            if any(k.startswith("features.8.") for k in keys)
            else "fast_mpn_cov_newmodel"
        )
    if any(k.startswith("AtMp") for k in keys):
        return "3gnet"
    if any(k.startswith(("layer_reduce.", "layer_reduce_bn.")) for k in keys):
        return {"isqrt": "fast_mpn_cov", "3g": "3gnet"}.get(head, "gg_jax")
    if any(k.startswith("head.") for k in keys):
        return "gg_jax"
    return "torchvision"


def default_convention(name: str) -> str:
    """The PyTorch naming `to_torch` writes for model `name`."""
    from gg_jax import models

    _, head = models.parse_name(name)
    return {"3g": "3gnet", "isqrt": "fast_mpn_cov", "gap": "torchvision"}.get(head, "gg_jax")


# ------------------------------------------------------------------------ conversion
def _as_numpy(value, key: str) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor (no torch import)
        t = value.detach().cpu()
        if str(t.dtype) in ("torch.bfloat16", "torch.float16"):
            t = t.float()
        return t.numpy()
    try:
        arr = np.asarray(value)
    except Exception as e:  # pragma: no cover - defensive
        raise TypeError(f"state_dict[{key!r}] is not an array: {type(value).__name__}") from e
    if arr.dtype == object:
        raise TypeError(
            f"state_dict[{key!r}] is not a numeric array (got {type(value).__name__}); "
            "pass a flat {name: tensor} state_dict."
        )
    return arr


@dataclasses.dataclass
class ConversionResult:
    """What `convert_state_dict` returns.

    variables: `{'params': ..., 'batch_stats': ...}` of NumPy float32 arrays.
    convention: the detected (or given) key convention.
    vector_order: "lower" or "upper", the order of the checkpoint's classifier input.
    num_classes: classes of the classifier (None with backbone_only).
    ignored_keys: checkpoint keys deliberately not used (backbone_only: head/classifier;
      always: num_batches_tracked).
    nonfinite: checkpoint key -> "N NaN, M inf" for every converted tensor holding NaN or
      inf values (a model with them computes NaN); empty for a sound checkpoint.
    """

    variables: dict[str, Any]
    convention: str
    vector_order: str
    num_classes: int | None
    ignored_keys: list[str]
    nonfinite: dict[str, str] = dataclasses.field(default_factory=dict)


def _nonfinite(values: Mapping[str, np.ndarray], names: Mapping[str, str]) -> dict[str, str]:
    """names[key] -> "N NaN, M inf" for the arrays of `values` that hold NaN or inf."""
    out = {}
    for key, arr in values.items():
        if not np.issubdtype(arr.dtype, np.floating) or np.isfinite(arr).all():
            continue
        counts = [(int(np.isnan(arr).sum()), "NaN"), (int(np.isinf(arr).sum()), "inf")]
        out[names.get(key, key)] = ", ".join(f"{n} {what}" for n, what in counts if n)
    return out


def convert_state_dict(
    state_dict: Mapping[str, Any],
    name: str,
    num_classes: int | None = None,
    *,
    backbone_only: bool = False,
    convention: str | None = None,
    vector_order: str | None = None,
    **options,
) -> ConversionResult:
    """`from_torch` with the details (detected convention, ignored keys) returned too."""
    from gg_jax import models

    models.parse_name(name)  # unknown names: ValueError listing the valid ones
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of key -> array, got {type(state_dict).__name__}.")
    valid = models.options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"Unknown option(s) {unknown} for model {name!r}. Valid options: {', '.join(valid)}.")
    if convention is None:
        convention = detect_convention(state_dict, name)
    elif convention not in CONVENTIONS:
        raise ValueError(f"Unknown convention {convention!r}; choose one of {', '.join(CONVENTIONS)}.")
    if vector_order is None:
        vector_order = "upper" if convention in _UPPER_ORDER_CONVENTIONS else "lower"
    elif vector_order not in ("lower", "upper"):
        raise ValueError(f"vector_order must be 'lower' (i >= j) or 'upper' (i <= j), got {vector_order!r}.")

    stripped = _strip_wrappers(list(state_dict))
    source: dict[str, tuple[str, Any]] = {}  # canonical key -> (original key, value)
    ignored = []
    for orig, key in stripped.items():
        if key.endswith("num_batches_tracked"):
            ignored.append(orig)
            continue
        source[_from_convention(key, convention)] = (orig, state_dict[orig])

    if num_classes is None:
        fc = source.get("fc.weight")
        if backbone_only:
            num_classes = 1
        elif fc is not None and len(getattr(fc[1], "shape", ())) == 2:
            num_classes = int(fc[1].shape[0])
        else:
            num_classes = 1  # fc.weight will be reported missing
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
    num_classes = int(num_classes)

    entries = _layout(name, num_classes, _freeze_options(options))
    if backbone_only:
        entries = tuple(e for e in entries if _backbone_module(e.path))
    expected = {e.key for e in entries}

    missing, wrong_shape = [], []
    values: dict[str, np.ndarray] = {}
    original_keys: dict[str, str] = {}
    for e in entries:
        ext = _to_convention(e.key, convention)
        if e.key not in source:
            missing.append(ext)
            continue
        orig, value = source[e.key]
        arr = _as_numpy(value, orig)
        if tuple(arr.shape) != e.torch_shape:
            wrong_shape.append(f"{orig}: checkpoint {tuple(arr.shape)}, model expects {e.torch_shape}")
            continue
        values[e.key] = arr
        original_keys[e.key] = orig
    unexpected = []
    for key, (orig, _) in source.items():
        if key in expected:
            continue
        if backbone_only and not re.match(r"(conv1|bn1|layer\d+)\.", key):
            ignored.append(orig)
        else:
            unexpected.append(orig)

    if missing or unexpected or wrong_shape:
        lines = [
            f"The PyTorch state_dict does not match {name!r} (num_classes={num_classes}"
            + "".join(f", {k}={v!r}" for k, v in sorted(options.items()))
            + f"; key convention {convention!r}):"
        ]
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", wrong_shape),
        ):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    {k}" for k in items)
        hints = []
        if not backbone_only and convention == "torchvision" and models.parse_name(name)[1] != "gap":
            hints.append(
                "this looks like a torchvision ResNet (backbone + fc only): to fine-tune it, "
                "convert with backbone_only=True (CLI: --backbone_only) and merge it into a fresh "
                "model with merge_backbone"
            )
        blocks = {int(m.group(1)) for k in source for m in [re.match(r"AtMp(\d+)\.", k)] if m}
        if (
            blocks
            and "num_blocks" not in options
            and len(blocks) != sum(1 for e in entries if e.key.endswith(".map1.weight"))
        ):
            hints.append(f"the checkpoint has {len(blocks)} re-weighting blocks: pass num_blocks={len(blocks)}")
        if any(k.startswith("fc.") for k in (w.split(":")[0] for w in wrong_shape)):
            hints.append("num_classes is read from fc.weight unless you pass it")
        if hints:
            lines.append("Hints: " + "; ".join(hints) + ".")
        raise CheckpointMismatchError("\n".join(lines))

    by_path: dict[tuple[str, tuple[str, ...]], list[tuple[int | None, np.ndarray]]] = {}
    for e in entries:
        arr = values[e.key]
        if e.kind == "conv":
            arr = arr.transpose(2, 3, 1, 0)
        elif e.kind == "linear":
            arr = arr.T
        by_path.setdefault((e.collection, e.path), []).append((e.scan_index, arr))

    flat: dict[str, dict[tuple[str, ...], np.ndarray]] = {"params": {}, "batch_stats": {}}
    for (col, path), items in by_path.items():
        if items[0][0] is None:
            arr = items[0][1]
        else:
            arr = np.stack([a for _, a in sorted(items, key=lambda x: x[0])])
        flat[col][path] = np.ascontiguousarray(arr, dtype=np.float32)

    if not backbone_only and _vector_head(name):
        target = "lower" if options.get("lower_triangle", True) else "upper"
        if target != vector_order:
            kernel = flat["params"][("fc", "kernel")]
            c = _tri_size(kernel.shape[0])
            if c is None:
                raise ValueError(f"fc has {kernel.shape[0]} inputs, not C(C+1)/2 for any C; cannot reorder the vector.")
            perm = _upper_to_lower(c)
            if target == "lower":  # source upper: ours[k] = source[perm[k]]
                kernel = kernel[perm]
            else:  # source lower, target upper
                kernel = kernel[np.argsort(perm)]
            flat["params"][("fc", "kernel")] = np.ascontiguousarray(kernel)

    variables = {col: traverse_util.unflatten_dict(f) for col, f in flat.items() if f}
    return ConversionResult(
        variables,
        convention,
        vector_order,
        None if backbone_only else num_classes,
        ignored,
        _nonfinite(values, original_keys),
    )


def _warn_nonfinite(res: ConversionResult, source: str = "The checkpoint") -> ConversionResult:
    if res.nonfinite:
        logging.getLogger(__name__).warning("%s", _nonfinite_message(res.nonfinite, source))
    return res


def _nonfinite_message(nonfinite: Mapping[str, str], source: str = "The checkpoint") -> str:
    shown = "; ".join(f"{k}: {v}" for k, v in list(nonfinite.items())[:5])
    more = f"; and {len(nonfinite) - 5} more" if len(nonfinite) > 5 else ""
    return (
        f"{source} holds NaN or inf values in {len(nonfinite)} tensor(s) ({shown}{more}); a model with these "
        "weights computes NaN (the run that saved them had probably diverged)."
    )


def from_torch(
    state_dict: Mapping[str, Any],
    name: str,
    num_classes: int | None = None,
    *,
    backbone_only: bool = False,
    convention: str | None = None,
    vector_order: str | None = None,
    **options,
) -> dict[str, Any]:
    """Convert a PyTorch state_dict into variables for `gg_jax.models.create(name, ...)`.

    Args:
      state_dict: `{key: array}`; values NumPy arrays or torch tensors (torch is not
        imported). Keys may carry DataParallel's `module.` prefix.
      name: model name (`gg_jax.models.names()`).
      num_classes: classes; read from the classifier's shape when None.
      backbone_only: convert only `conv1`, `bn1`, `layer1..4` (torchvision or any
        convention) and ignore the head and classifier; merge the result into freshly
        initialised variables with `merge_backbone` to fine-tune.
      convention: force a key convention (`CONVENTIONS`); detected when None.
      vector_order: "lower" (i >= j) or "upper" (i <= j) order of the checkpoint's
        classifier input; None: "upper" for fast-MPN-COV, "lower" otherwise.
      **options: model options given to `create` (e.g. `num_blocks=1`).

    Returns:
      `{'params': ..., 'batch_stats': ...}` of float32 NumPy arrays (with
      `backbone_only`, the backbone entries only). Tensors holding NaN or inf are
      converted with a logged warning that names them.

    Raises:
      CheckpointMismatchError (a ValueError) listing every missing, unexpected and
      mis-shaped key by name.
    """
    res = convert_state_dict(
        state_dict,
        name,
        num_classes,
        backbone_only=backbone_only,
        convention=convention,
        vector_order=vector_order,
        **options,
    )
    return _warn_nonfinite(res, "The state_dict").variables


def merge_backbone(variables: Mapping[str, Any], backbone: Mapping[str, Any]) -> dict[str, Any]:
    """`variables` with the backbone entries (`from_torch(..., backbone_only=True)`) replaced.

    Everything else (head, classifier) keeps its value. Every entry of `backbone` must
    exist in `variables` with the same shape (`CheckpointMismatchError` otherwise).
    """
    return variables_io.merge(variables, backbone, partial_source=True)[0]


def _num_classes_of(variables) -> int:
    try:
        return int(np.shape(variables["params"]["fc"]["kernel"])[1])
    except (KeyError, TypeError, IndexError) as e:
        raise ValueError("variables have no params/fc/kernel; pass the variables of a gg_jax model.") from e


def torch_layout(
    name: str, num_classes: int = 1000, *, convention: str | None = None, **options
) -> list[tuple[str, tuple[int, ...]]]:
    """`[(key, shape), ...]` of the PyTorch state_dict `to_torch` writes, in PyTorch's order.

    For "*_3g" this is the released 3G-Net's layout (`layout.json`).
    """
    from gg_jax import models

    models.parse_name(name)
    convention = convention or default_convention(name)
    out = []
    for e in _layout(name, num_classes, _freeze_options(options)):
        out.append((_to_convention(e.key, convention), e.torch_shape))
        if e.key.endswith(".running_var"):
            out.append((_to_convention(e.key[: -len("running_var")] + "num_batches_tracked", convention), ()))
    if convention in ("fast_mpn_cov_newmodel", "fast_mpn_cov_newmodel_pretrained"):
        group = lambda k: 0 if k.startswith("features.") else 1 if k.startswith("classifier.") else 2  # noqa: E731
        out.sort(key=lambda kv: group(kv[0]))  # Newmodel's order: features, classifier, representation
    return out


def to_torch(
    variables: Mapping[str, Any],
    name: str,
    *,
    convention: str | None = None,
    vector_order: str | None = None,
    **options,
) -> dict[str, np.ndarray]:
    """Inverse of `from_torch`: an ordered `{key: NumPy array}` PyTorch state_dict.

    `convention` defaults to the model's original: "3gnet" for *_3g (the released
    3G-Net keys), "fast_mpn_cov" for *_isqrt (MPNCOVResNet keys, vector i <= j),
    "torchvision" for *_gap, "gg_jax" otherwise. `num_batches_tracked` entries are 0.
    Use `{k: torch.from_numpy(v) for k, v in ...}` for `load_state_dict`.
    """
    from gg_jax import models

    models.parse_name(name)
    convention = convention or default_convention(name)
    if convention not in CONVENTIONS:
        raise ValueError(f"Unknown convention {convention!r}; choose one of {', '.join(CONVENTIONS)}.")
    if vector_order is None:
        vector_order = "upper" if convention in _UPPER_ORDER_CONVENTIONS else "lower"
    num_classes = _num_classes_of(variables)
    entries = _layout(name, num_classes, _freeze_options(options))
    flat = {col: traverse_util.flatten_dict(dict(variables.get(col, {}))) for col in ("params", "batch_stats")}
    expected = {(e.collection, e.path) for e in entries}
    missing = [f"{e.collection}/{'/'.join(e.path)}" for e in entries if e.path not in flat[e.collection]]
    extra = [f"{c}/{'/'.join(p)}" for c in flat for p in flat[c] if (c, p) not in expected]
    if missing or extra:
        raise CheckpointMismatchError(
            f"variables do not match {name!r}:"
            + (f"\n  missing: {', '.join(missing)}" if missing else "")
            + (f"\n  unexpected: {', '.join(extra)}" if extra else "")
        )
    fc_kernel = None
    if _vector_head(name):
        source = "lower" if options.get("lower_triangle", True) else "upper"
        if source != vector_order:
            k = np.asarray(flat["params"][("fc", "kernel")])
            perm = _upper_to_lower(_tri_size(k.shape[0]))
            fc_kernel = k[np.argsort(perm)] if source == "lower" else k[perm]
    out: dict[str, np.ndarray] = {}
    for e in entries:
        arr = np.asarray(flat[e.collection][e.path])
        if e.path == ("fc", "kernel") and fc_kernel is not None:
            arr = fc_kernel
        if e.scan_index is not None:
            arr = arr[e.scan_index]
        if e.kind == "conv":
            arr = arr.transpose(3, 2, 0, 1)
        elif e.kind == "linear":
            arr = arr.T
        if tuple(arr.shape) != e.torch_shape:
            raise CheckpointMismatchError(
                f"{e.collection}/{'/'.join(e.path)} has shape {np.shape(flat[e.collection][e.path])}, "
                f"expected the PyTorch shape {e.torch_shape} after transposing."
            )
        out[_to_convention(e.key, convention)] = np.ascontiguousarray(arr, dtype=np.float32)
        if e.key.endswith(".running_var"):
            counter = e.key[: -len("running_var")] + "num_batches_tracked"
            out[_to_convention(counter, convention)] = np.zeros((), np.int64)
    order = [k for k, _ in torch_layout(name, num_classes, convention=convention, **options)]
    return {k: out[k] for k in order}


# ---------------------------------------------------------------------- .pth files
_RESAVE_SNIPPET = (
    "    import torch\n"
    "    ckpt = torch.load(PATH, map_location='cpu', weights_only=False)  # only if you trust PATH\n"
    "    sd = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else ckpt.state_dict()\n"
    "    torch.save({k: v for k, v in sd.items() if torch.is_tensor(v)}, 'state_dict_only.pth')"
)


def _to_python(v):
    """A JSON-friendly scalar (numbers in tensors/NumPy scalars unwrapped) or None."""
    if isinstance(v, (int, float, str, bool)):
        return v
    if hasattr(v, "item") and int(np.prod(getattr(v, "shape", ()))) == 1:
        return v.item()
    return None


def _safe_numpy_globals():
    """numpy scalar/dtype reconstructors: harmless, and common in `best_prec1` entries."""
    out = []
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            m = __import__(mod, fromlist=["scalar"])
            out.append(m.scalar)
            break
        except (ImportError, AttributeError):
            continue
    out.append(np.dtype)
    for t in (np.float64, np.float32, np.float16, np.int64, np.int32):
        out.append(type(np.dtype(t)))
    return out


def _unpickler_detail(msg: str) -> str:
    """The informative line(s) of torch's weights_only error message."""
    boiler = (
        "Weights only load failed",
        "In PyTorch 2.6",
        "Re-running",
        "Please file an issue",
        "Check the documentation",
        "This file can still be loaded",
        "(1)",
        "(2)",
    )
    lines = [ln.strip() for ln in msg.splitlines()]
    keep = [ln for ln in lines if ln and not ln.startswith(boiler)]
    return " ".join(keep).replace("WeightsUnpickler error: ", "") or msg


def _read_pth(path: str):
    if not os.path.exists(path):
        raise FileNotFoundError(f"PyTorch checkpoint {path!r} does not exist.")
    if not os.path.isfile(path):
        raise IsADirectoryError(f"PyTorch checkpoint {path!r} is not a file.")
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"Reading {path!r} needs PyTorch (pip install torch; the CPU build is enough). "
            "gg_jax itself does not need it: from_torch also accepts a dict of NumPy arrays."
        ) from e
    import pickle

    try:
        with torch.serialization.safe_globals(_safe_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "global" in msg.lower():
            found = re.findall(r"GLOBAL ([\w.]+)", msg)
            raise UnsafeCheckpointError(
                f"Refusing to load {path!r}: the file contains arbitrary Python objects"
                + (f" ({', '.join(sorted(set(found)))})" if found else "")
                + ", and unpickling them would execute code from the file. gg_jax only reads "
                "tensors, numbers and dicts (torch.load(..., weights_only=True)). If you trust the "
                "file, re-save its state_dict only, e.g.\n" + _RESAVE_SNIPPET.replace("PATH", repr(path))
            ) from None
        raise ValueError(
            f"{path!r} is not a readable PyTorch checkpoint: torch.load(..., weights_only=True) "
            "failed (the file is corrupt or truncated, was not written by torch.save, or uses "
            f"pickle features the safe loader refuses): {_unpickler_detail(msg)}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ValueError(
            f"{path!r} is not a readable PyTorch checkpoint (corrupt, truncated or not written by torch.save): {e}"
        ) from None


def _is_tensor_like(v) -> bool:
    return hasattr(v, "shape") and (hasattr(v, "detach") or isinstance(v, np.ndarray))


def _extract_state_dict(obj, path: str):
    """(state_dict, meta) from a released-style dict or a bare state_dict."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a state_dict or a dict with 'state_dict'.")
    for key in ("state_dict", "model_state_dict", "model"):
        if key in obj and isinstance(obj[key], Mapping):
            meta = {k: _to_python(obj[k]) for k in ("epoch", "arch", "best_prec1", "best_acc1") if k in obj}
            return obj[key], {k: v for k, v in meta.items() if v is not None}
    if obj and all(_is_tensor_like(v) for v in obj.values()):
        return obj, {}
    raise ValueError(
        f"{path!r} has no 'state_dict' entry and is not a state_dict itself "
        f"(top-level keys: {', '.join(map(str, list(obj)[:20]))})."
    )


def load_torch_checkpoint(
    path: str, name: str, num_classes: int | None = None, *, backbone_only: bool = False, **kwargs
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a `.pth` / `.pth.tar` checkpoint and convert it for `create(name, ...)`.

    The file may be a released-style dict (`state_dict`, `epoch`, `arch`, `best_prec1`,
    `optimizer`, ...) or a bare state_dict. It is read with
    `torch.load(path, map_location='cpu', weights_only=True)`: files that need arbitrary
    Python objects are refused (`UnsafeCheckpointError`) and nothing in them is executed.

    Weights holding NaN or inf are converted with a logged warning naming them (the
    command line refuses them unless given --allow_nonfinite).

    Returns:
      `(variables, meta)`: the variables as `from_torch` returns them, and meta with
      "model", "num_classes", "source" (the path), "convention", "vector_order" and the
      file's "epoch", "arch", "best_prec1" where present.
    """
    from gg_jax import models

    models.parse_name(name)
    path = os.fspath(path)
    state_dict, file_meta = _extract_state_dict(_read_pth(path), path)
    res = _warn_nonfinite(
        convert_state_dict(state_dict, name, num_classes, backbone_only=backbone_only, **kwargs), repr(path)
    )
    meta = {
        "model": name,
        "num_classes": res.num_classes,
        "source": os.path.abspath(path),
        "convention": res.convention,
        "vector_order": res.vector_order,
    }
    meta.update(file_meta)
    return res.variables, meta


# ----------------------------------------------------------------------------- CLI
def _count(tree) -> int:
    return int(sum(np.size(v) for v in traverse_util.flatten_dict(dict(tree)).values()))


def main(argv: Sequence[str] | None = None) -> int:
    from gg_jax import models

    p = argparse.ArgumentParser(
        prog="python -m gg_jax.convert",
        description="Convert a PyTorch checkpoint (3G-Net, fast-MPN-COV iSQRT-COV, torchvision ResNet) "
        "into a gg_jax variables directory (read by gg_jax.variables_io.load_variables).",
    )
    p.add_argument("--arch", required=True, help=f"model name, one of: {', '.join(models.names())}")
    p.add_argument("--torch_checkpoint", required=True, help=".pth / .pth.tar file (read with weights_only=True)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in --out")
    p.add_argument(
        "--num_classes",
        type=int,
        default=None,
        help="classes (default: from the checkpoint's classifier; required with --backbone_only)",
    )
    p.add_argument(
        "--backbone_only",
        action="store_true",
        help="take only conv1/bn1/layer1..4 from the checkpoint (e.g. torchvision ImageNet "
        "weights); the head and classifier are freshly initialised with --seed",
    )
    p.add_argument("--seed", type=int, default=0, help="init seed of the head/classifier with --backbone_only")
    p.add_argument("--convention", choices=CONVENTIONS, default=None, help="force the key convention")
    p.add_argument(
        "--allow_nonfinite",
        action="store_true",
        help="convert even if some weights are NaN or inf (refused by default: such a model computes NaN)",
    )
    p.add_argument(
        "--vector_order",
        choices=("lower", "upper"),
        default=None,
        help="order of the checkpoint's covariance vector (default: upper for fast-MPN-COV)",
    )
    args = p.parse_args(argv)
    try:
        models.parse_name(args.arch)
    except ValueError as e:
        p.error(str(e))
    if args.backbone_only and args.num_classes is None:
        p.error("--backbone_only needs --num_classes (the new classifier's size).")

    try:
        state_dict, file_meta = _extract_state_dict(_read_pth(args.torch_checkpoint), args.torch_checkpoint)
        res = convert_state_dict(
            state_dict,
            args.arch,
            args.num_classes,
            backbone_only=args.backbone_only,
            convention=args.convention,
            vector_order=args.vector_order,
        )
    except (ValueError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if res.nonfinite and not args.allow_nonfinite:
        message = _nonfinite_message(res.nonfinite, repr(args.torch_checkpoint))
        print(f"error: {message} Nothing was written; pass --allow_nonfinite to convert anyway.", file=sys.stderr)
        return 1
    variables = res.variables
    num_classes = res.num_classes
    if args.backbone_only:
        import jax
        import jax.numpy as jnp

        num_classes = args.num_classes
        model = models.create(args.arch, num_classes=num_classes)
        init = jax.jit(functools.partial(model.init, train=False))(
            jax.random.PRNGKey(args.seed), jnp.zeros((1, 64, 64, 3), jnp.float32)
        )
        variables = merge_backbone(jax.tree.map(np.asarray, init), variables)
    meta = {
        "model": args.arch,
        "num_classes": num_classes,
        "source": os.path.abspath(args.torch_checkpoint),
        "convention": res.convention,
        "vector_order": res.vector_order,
        "backbone_only": args.backbone_only,
    }
    if args.backbone_only:
        meta["init_seed"] = args.seed
    meta.update(file_meta)
    try:
        variables_io.save_variables(args.out, variables, meta, overwrite=args.overwrite)
    except FileExistsError as e:
        print(f"error: {e} (use --overwrite)", file=sys.stderr)
        return 1
    n_params = _count(variables["params"])
    print(f"Converted {args.torch_checkpoint} -> {os.path.abspath(args.out)}")
    print(
        f"  model {args.arch}, {num_classes} classes, {n_params:,} parameters "
        f"({_count(variables.get('batch_stats', {})):,} batch statistics)"
    )
    print(
        f"  key convention {res.convention}, vector order {res.vector_order}"
        + (f", backbone only (head/classifier freshly initialised, seed {args.seed})" if args.backbone_only else "")
    )
    src = ", ".join(f"{k} {file_meta[k]}" for k in ("arch", "epoch", "best_prec1", "best_acc1") if k in file_meta)
    print(f"  source: {src or 'bare state_dict'}")
    if res.ignored_keys:
        shown = [k for k in res.ignored_keys if not k.endswith("num_batches_tracked")]
        if shown:
            more = " ..." if len(shown) > 8 else ""
            print(f"  ignored {len(shown)} checkpoint keys: {', '.join(shown[:8])}{more}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
