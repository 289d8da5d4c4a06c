"""What a state_dict's keys and shapes say about the model that saved it.

Read from the canonical keys (`gg_jax.convert.keys`): whether it is a ResNet at all, its depth
(BasicBlock or Bottleneck, blocks per stage), and the head options its tensors fix (the number
of re-weighting blocks, their variant and hidden width, the reduction's channels). The
conversion infers those options from it, or names the option to pass when a state_dict does
not fit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from gg_jax import backbones, models
from gg_jax.backbones import resnet

Shapes = Mapping[str, tuple[int, ...]]  # canonical key -> tensor shape

_STAGE_KEY = re.compile(r"layer([1-4])\.(\d+)\.(\w+)\.")
_BLOCK_KEY = re.compile(r"AtMp(\d+)\.")
# What each option read from a state_dict is, and where it is read.
_OPTION_TEXT = {
    "num_blocks": "number of re-weighting blocks (AtMp1..T)",
    "reweighting": "re-weighting block variant",
    "hidden": "hidden width of the re-weighting blocks (atmap1)",
    "reduction_dim": "width of the channel reduction (layer_reduce)",
}
# The value of an option a model's layout does not show (no re-weighting blocks, no reduction).
_ABSENT = {"num_blocks": 0, "reduction_dim": 0}


def is_resnet(shapes: Shapes) -> bool:
    """Whether the state_dict holds a ResNet: a 7x7 RGB stem `conv1` or residual blocks `layerN.M.*`."""
    stem = shapes.get("conv1.weight")
    return (stem is not None and tuple(stem[1:]) == (3, 7, 7)) or any(_STAGE_KEY.match(k) for k in shapes)


def resnet_depth(keys) -> tuple[str, tuple[int, ...]] | None:
    """("BasicBlock" or "Bottleneck", blocks per stage) of a ResNet state_dict; None without stages."""
    stages: dict[int, int] = {}
    bottleneck = False
    for key in keys:
        m = _STAGE_KEY.match(key)
        if m:
            stage, index = int(m.group(1)), int(m.group(2))
            stages[stage] = max(stages.get(stage, 0), index + 1)
            bottleneck |= m.group(3) in ("conv3", "bn3")
    if not stages:
        return None
    return ("Bottleneck" if bottleneck else "BasicBlock", tuple(stages.get(s, 0) for s in range(1, 5)))


def _backbone_depth(backbone: str) -> tuple[str, tuple[int, ...]] | None:
    factory = backbones.BACKBONES[backbone]
    if factory.func is not resnet.ResNet:
        return None
    return factory.keywords["block_cls"].__name__, tuple(factory.keywords["stage_sizes"])


def _counts(depth: tuple[str, tuple[int, ...]]) -> str:
    return f"{depth[0]}s {','.join(map(str, depth[1]))}"


def depth_hint(shapes: Shapes, name: str) -> str | None:
    """A line naming the model that a ResNet state_dict of another depth than `name`'s converts to."""
    found = resnet_depth(shapes)
    backbone, head = models.parse_name(name)
    if found is None or found == _backbone_depth(backbone):
        return None
    for other in backbones.BACKBONES:
        if _backbone_depth(other) == found:
            number = other[len("resnet") :]
            return f"this is a ResNet-{number} ({_counts(found)}) checkpoint; convert it with --arch {other}_{head}"
    known = "; ".join(f"{b} {_counts(d)}" for b in backbones.BACKBONES if (d := _backbone_depth(b)))
    return f"this is a ResNet of {_counts(found)}, which no gg_jax backbone has ({known})"


def head_options(shapes: Shapes, name: str) -> dict[str, object]:
    """The options of model `name` that the state_dict's head tensors fix."""
    valid = models.options(name)
    out: dict[str, object] = {}
    blocks = sorted({int(m.group(1)) for k in shapes for m in [_BLOCK_KEY.match(k)] if m})
    if blocks:
        first = f"AtMp{blocks[0]}"
        if "num_blocks" in valid:
            out["num_blocks"] = len(blocks)
        if "reweighting" in valid:
            variant = (
                "3g"
                if f"{first}.atmap3.weight" in shapes
                else "urm_v2"
                if f"{first}.map1.weight" in shapes
                else "urm_v1"
            )
            out["reweighting"] = variant
        atmap1 = shapes.get(f"{first}.atmap1.weight")
        if "hidden" in valid and atmap1 is not None and len(atmap1) == 4:
            out["hidden"] = int(atmap1[0])
    reduce = shapes.get("layer_reduce.weight")
    if "reduction_dim" in valid and reduce is not None and len(reduce) == 4:
        out["reduction_dim"] = int(reduce[0])
    return out


def _flag(option: str, value) -> str:
    return f"{option}={value!r} (--{option} {value})"


def option_hints(found: Mapping[str, object], expected: Mapping[str, object]) -> list[str]:
    """One line per option whose value in the state_dict (`found`) differs from the model's."""
    hints = []
    for option, value in found.items():
        model = expected.get(option, _ABSENT.get(option))
        if model is not None and model != value:
            hints.append(
                f"the checkpoint's {_OPTION_TEXT[option]} is {value!r}, the model's {model!r}: "
                f"pass {_flag(option, value)}"
            )
    return hints


def not_a_resnet(keys: Sequence[str], name: str, convention: str) -> str:
    """The message for a state_dict that holds no ResNet."""
    shown = ", ".join(keys[:10]) + (f", ... ({len(keys)} keys)" if len(keys) > 10 else "")
    return (
        f"The PyTorch state_dict is not a ResNet state dict: its keys are {shown or 'none (it is empty)'}. "
        f"{name!r} is a ResNet (conv1, bn1, layer1..4, then its head and fc; key convention {convention!r}): "
        "pass the state_dict of a ResNet (3G-Net, fast-MPN-COV iSQRT-COV or torchvision)."
    )
