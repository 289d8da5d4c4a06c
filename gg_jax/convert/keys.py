"""Key conventions: which PyTorch naming a state_dict uses, and the renaming to and from ours.

Every key is handled in its canonical form, the released 3G-Net's names (`conv1`, `layer1.0.conv1`,
`layer_reduce`, `AtMp1.map1`, `fc`, and `head.*` for head extras without a PyTorch original).
`rename` maps a canonical key to a convention's and back, with one table per convention.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gg_jax import models
from gg_jax.convert.errors import CheckpointMismatchError, ConversionError

CONVENTIONS = (
    "3gnet",
    "fast_mpn_cov",
    "fast_mpn_cov_newmodel",
    "fast_mpn_cov_newmodel_pretrained",
    "torchvision",
    "gg_jax",
)
# fast-MPN-COV stores the covariance vector S[i, j], i <= j; the others i >= j (ours).
_UPPER_ORDER_CONVENTIONS = ("fast_mpn_cov", "fast_mpn_cov_newmodel", "fast_mpn_cov_newmodel_pretrained")

# (canonical prefix, the convention's prefix); conventions not listed use the canonical keys.
_NEWMODEL_BACKBONE = (("conv1.", "features.0."), ("bn1.", "features.1.")) + tuple(
    (f"layer{s}.", f"features.{3 + s}.") for s in range(1, 5)
)
_RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    # fast-MPN-COV `main.py` models trained from scratch: the reduction in the representation.
    "fast_mpn_cov_newmodel": _NEWMODEL_BACKBONE
    + (
        ("layer_reduce.", "representation.conv_dr_block.0."),
        ("layer_reduce_bn.", "representation.conv_dr_block.1."),
        ("fc.", "classifier."),
    ),
    # Its fine-tuning scripts: the reduction appended to the features.
    "fast_mpn_cov_newmodel_pretrained": _NEWMODEL_BACKBONE
    + (("layer_reduce.", "features.8."), ("layer_reduce_bn.", "features.9."), ("fc.", "classifier.")),
}
NEWMODEL_CONVENTIONS = tuple(_RENAMES)


def rename(key: str, convention: str, *, inverse: bool = False) -> str:
    """A canonical key in `convention`'s naming, or with `inverse` a `convention` key in the canonical one."""
    for canonical, external in _RENAMES.get(convention, ()):
        before, after = (external, canonical) if inverse else (canonical, external)
        if key.startswith(before):
            return after + key[len(before) :]
    return key


def counter_key(running_var_key: str) -> str:
    """The `num_batches_tracked` entry PyTorch stores beside a BatchNorm's `running_var`."""
    return running_var_key[: -len("running_var")] + "num_batches_tracked"


def check_convention(convention: str) -> str:
    if convention not in CONVENTIONS:
        raise ConversionError(f"Unknown convention {convention!r}; choose one of {', '.join(CONVENTIONS)}.")
    return convention


def vector_order(convention: str, given: str | None = None) -> str:
    """The order of the checkpoint's covariance vector: `given`, or the convention's."""
    if given is None:
        return "upper" if convention in _UPPER_ORDER_CONVENTIONS else "lower"
    if given not in ("lower", "upper"):
        raise ConversionError(f"vector_order must be 'lower' (i >= j) or 'upper' (i <= j), got {given!r}.")
    return given


def strip_wrappers(keys: Sequence[str]) -> dict[str, str]:
    """external key -> key without DataParallel's `module.` components (anywhere in the key)."""
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
    _, head = models.parse_name(name)
    keys = set(strip_wrappers(list(state_dict)).values())
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
    _, head = models.parse_name(name)
    return {"3g": "3gnet", "isqrt": "fast_mpn_cov", "gap": "torchvision"}.get(head, "gg_jax")
