"""PyTorch checkpoints <-> gg_jax variables.

Converts the released 3G-Net checkpoints, fast-MPN-COV's iSQRT-COV ResNets and
torchvision ResNets into the variables of `gg_jax.models.create(name, ...)`:

    from gg_jax import convert, models
    variables, meta = convert.load_torch_checkpoint("3gnet_resnet50.pth.tar", "resnet50_3g")
    model = models.create("resnet50_3g", num_classes=meta["num_classes"], **meta["model_options"])
    logits = model.apply(variables, images_nhwc, train=False)

    # state_dicts already in memory (NumPy arrays or torch tensors; torch not needed):
    variables = convert.from_torch(state_dict, "resnet50_3g")

    # fine-tuning from a torchvision (or any) ResNet: backbone only, new head/classifier
    variables = models.init_variables(model, rng)
    variables = convert.merge_backbone(variables, convert.from_torch(tv_state_dict, "resnet50_3g",
                                                                   backbone_only=True))

Command line (writes a directory that `gg_jax.checkpoints.load` reads, as training's
`init_from` and evaluation's `--checkpoint` do; `gg_jax.convert.command`):

    python -m gg_jax.convert --arch resnet50_3g --torch_checkpoint FILE --out DIR [--overwrite]

Key conventions (detected automatically, `detect_convention`; `gg_jax.convert.keys`):
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
the classifier's input rows are permuted (`gg_jax.convert.vector`) and the result is an
ordinary `resnet50_isqrt` with the default `lower_triangle=True`.

Transforms (`gg_jax.convert.layout`): conv OIHW -> HWIO; linear [out, in] -> [in, out];
BatchNorm weight, bias, running_mean, running_var -> scale, bias, mean, var
(`num_batches_tracked` is ignored); `AtMp1..T` are stacked on the leading (nn.scan) axis of
`head/reweighting/blocks/block`.

Modules, each importing only those above it in this list:
  errors      the errors, every one a `gg_jax.errors.UserError`
  keys        conventions: detection, renaming both ways, DataParallel prefixes
  vector      the lower/upper covariance vector orders
  layout      a model's PyTorch tensors, one `Entry` each
  structure   what a state_dict's keys say: ResNet depth, head options
  pth         safe `.pth` reading (the only module that imports torch, when it reads a file)
  conversion  state_dict <-> variables, `load_torch_checkpoint`
  command     `python -m gg_jax.convert`
"""

from __future__ import annotations

from gg_jax.convert.command import main
from gg_jax.convert.conversion import (
    ConversionResult,
    convert_state_dict,
    from_torch,
    load_torch_checkpoint,
    merge_backbone,
    to_torch,
    torch_layout,
)
from gg_jax.convert.errors import (
    CheckpointMismatchError,
    ConversionError,
    NonfiniteWeightsError,
    UnreadableCheckpointError,
    UnsafeCheckpointError,
)
from gg_jax.convert.keys import CONVENTIONS, default_convention, detect_convention

__all__ = [
    "CONVENTIONS",
    "CheckpointMismatchError",
    "ConversionError",
    "ConversionResult",
    "NonfiniteWeightsError",
    "UnreadableCheckpointError",
    "UnsafeCheckpointError",
    "convert_state_dict",
    "default_convention",
    "detect_convention",
    "from_torch",
    "load_torch_checkpoint",
    "main",
    "merge_backbone",
    "to_torch",
    "torch_layout",
]
