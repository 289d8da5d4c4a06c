"""The PyTorch state_dict of a gg_jax model: one `Entry` per tensor, in PyTorch's order.

`layout(name, num_classes, options)` enumerates the variables of `gg_jax.models.create(name, ...)`
(their shapes only, nothing is computed) and names each one's PyTorch tensor in the canonical
(released 3G-Net) convention: conv kernels OIHW <-> HWIO, linear weights `[out, in]` <->
`[in, out]`, BatchNorm `weight, bias, running_mean, running_var` <-> `scale, bias, mean, var`,
and the blocks `AtMp1..T` on the leading (nn.scan) axis of `head/reweighting/blocks/block`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import Any

import jax
from flax import traverse_util

from gg_jax import models
from gg_jax.convert.errors import ConversionError

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
_BACKBONE_KEY = re.compile(r"(conv1|bn1|layer\d+)\.")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One PyTorch tensor (canonical 3G-Net name) and where it lives in our variables."""

    key: str  # canonical (3G-Net style) PyTorch key
    torch_shape: tuple[int, ...]
    collection: str  # "params" or "batch_stats"
    path: tuple[str, ...]  # path inside the collection, leaf included
    kind: str  # "conv", "linear", "vector" (1-d, copied)
    scan_index: int | None  # index on the nn.scan axis, or None

    @property
    def backbone(self) -> bool:
        return is_backbone_key(self.key)


def is_backbone_key(key: str) -> bool:
    """A canonical key of the ResNet backbone (`conv1`, `bn1`, `layer1..4`)."""
    return _BACKBONE_KEY.match(key) is not None


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


def _check_resnet(name: str) -> None:
    """The PyTorch checkpoints converted here are ResNets; other backbones have no original."""
    backbone, _ = models.parse_name(name)
    if not backbone.startswith("resnet"):
        raise ConversionError(
            f"gg_jax.convert reads and writes ResNet checkpoints (the reference 3G-Net, fast-MPN-COV, "
            f"torchvision); {name!r} has the {backbone} backbone, which has no PyTorch checkpoint layout here."
        )


def _variable_shapes(name: str, num_classes: int, options: Mapping[str, Any]):
    """`{collection: {path: shape}}` of `create(name, ...)`'s variables, none of them computed."""
    try:
        model = models.create(name, num_classes=num_classes, **options)
    except ValueError as e:  # an unknown option or one out of range: the model's message names it
        raise ConversionError(str(e)) from None
    shapes = models.init_variables(model, jax.random.PRNGKey(0), abstract=True)
    return {col: traverse_util.flatten_dict(dict(shapes.get(col, {}))) for col in ("params", "batch_stats")}


def layout(name: str, num_classes: int, options: Mapping[str, Any]) -> tuple[Entry, ...]:
    """The entries of `create(name, num_classes=..., **options)`, in PyTorch's order."""
    _check_resnet(name)
    return _layout(name, num_classes, tuple(sorted(options.items())))


@functools.lru_cache(maxsize=64)
def _layout(name: str, num_classes: int, frozen_options) -> tuple[Entry, ...]:
    shapes = _variable_shapes(name, num_classes, dict(frozen_options))
    modules: dict[tuple[str, ...], dict[str, dict[str, tuple[int, ...]]]] = {}
    for col, flat in shapes.items():
        for path, leaf in flat.items():
            modules.setdefault(path[:-1], {}).setdefault(col, {})[path[-1]] = tuple(leaf.shape)
    entries: list[Entry] = []

    def add_module(mod, leaves, t):
        params = leaves.get("params", {})
        stats = leaves.get("batch_stats", {})
        per = (lambda s: s[1:]) if t is not None else (lambda s: s)  # noqa: E731
        torch_mod = _canonical_module(mod, t)
        if "kernel" in params:
            k = per(params["kernel"])
            if len(k) == 4:  # HWIO -> OIHW
                entries.append(
                    Entry(f"{torch_mod}.weight", (k[3], k[2], k[0], k[1]), "params", mod + ("kernel",), "conv", t)
                )
            elif len(k) == 2:  # [in, out] -> [out, in]
                entries.append(Entry(f"{torch_mod}.weight", (k[1], k[0]), "params", mod + ("kernel",), "linear", t))
            else:
                raise ConversionError(f"no PyTorch equivalent for kernel {'/'.join(mod)} of shape {k} of {name!r}")
            if "bias" in params:
                entries.append(Entry(f"{torch_mod}.bias", per(params["bias"]), "params", mod + ("bias",), "vector", t))
        elif "scale" in params:
            for col, leaf, tleaf in _BN_LEAVES:
                src = params if col == "params" else stats
                entries.append(Entry(f"{torch_mod}.{tleaf}", per(src[leaf]), col, mod + (leaf,), "vector", t))
        else:
            raise ConversionError(
                f"{name!r} with options {dict(frozen_options)} has variables without a PyTorch equivalent: "
                f"{'/'.join(mod)} ({', '.join(sorted(params))})."
            )

    for mod in sorted(modules, key=_module_sort_key):
        if mod[:4] != _SCAN_PATH:
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


def vector_head(name: str) -> bool:
    """Whether the model's head outputs a covariance vector (it has `lower_triangle`)."""
    return "lower_triangle" in models.options(name)
