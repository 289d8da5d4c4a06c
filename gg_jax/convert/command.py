"""`python -m gg_jax.convert`: a PyTorch checkpoint file -> a gg_jax variables directory.

    python -m gg_jax.convert --arch resnet50_3g --torch_checkpoint FILE --out DIR [--overwrite]
        [--num_blocks T --reduction_dim R ...] [--backbone_only --num_classes N [--seed S]]

Every model option of `gg_jax.models.create` is a flag; those the checkpoint's tensors fix
(`num_blocks`, `reweighting`, `hidden`, `reduction_dim`) are read from it when not given. The
options end up in DIR/meta.json (`model_options`), so that `gg_jax.checkpoints.load(DIR)` builds
the same model. Errors a user fixes raise `gg_jax.errors.UserError`s; `cli.run_tool` prints them
as one `error:` line.
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Sequence

import jax
import numpy as np
from flax import traverse_util

from gg_jax import checkpoints, cli, cpu, models
from gg_jax.convert import keys
from gg_jax.convert.conversion import load_torch_checkpoint, merge_backbone


@functools.cache
def model_options() -> dict[str, tuple[str, ...]]:
    """option -> the heads of the convertible (ResNet) models that take it, in `options` order."""
    heads: dict[str, list[str]] = {}
    for name in models.names():
        backbone, head = models.parse_name(name)
        if backbone.startswith("resnet"):
            for option in models.options(name):
                if head not in heads.setdefault(option, []):
                    heads[option].append(head)
    return {option: tuple(h) for option, h in heads.items()}


def option_value(text: str):
    """A model option's value from the command line: true/false, an int, a float, or the text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m gg_jax.convert",
        description="Convert a PyTorch checkpoint (3G-Net, fast-MPN-COV iSQRT-COV, torchvision ResNet) "
        "into a gg_jax variables directory (read by gg_jax.checkpoints.load).",
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
    p.add_argument("--convention", choices=keys.CONVENTIONS, default=None, help="force the key convention")
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
    group = p.add_argument_group(
        "model options",
        "gg_jax.models.create's options of --arch (see gg_jax.models.options); num_blocks, reweighting, hidden "
        "and reduction_dim are read from the checkpoint when not given. All are written to meta.json.",
    )
    every = set(models.HEADS)
    for option, heads in model_options().items():
        takes = "every model" if set(heads) == every else f"head{'s' * (len(heads) > 1)} {', '.join(heads)}"
        group.add_argument(f"--{option}", type=option_value, default=None, metavar="VALUE", help=f"({takes})")
    return p


def _count(tree) -> int:
    return int(sum(np.size(v) for v in traverse_util.flatten_dict(dict(tree)).values()))


def main(argv: Sequence[str] | None = None) -> int:
    """Convert, write, print a summary; every error a user fixes is raised as a `UserError`."""
    p = _parser()
    args = p.parse_args(argv)
    try:
        models.parse_name(args.arch)
    except ValueError as e:
        p.error(str(e))
    if args.backbone_only and args.num_classes is None:
        p.error("--backbone_only needs --num_classes (the new classifier's size).")
    options = {o: getattr(args, o) for o in model_options() if getattr(args, o) is not None}
    valid = models.options(args.arch)
    foreign = [f"--{o}" for o in options if o not in valid]
    if foreign:
        p.error(f"{', '.join(foreign)}: not an option of {args.arch} (its options: {', '.join(valid)})")

    variables, meta = load_torch_checkpoint(
        args.torch_checkpoint,
        args.arch,
        args.num_classes,
        backbone_only=args.backbone_only,
        convention=args.convention,
        vector_order=args.vector_order,
        allow_nonfinite=args.allow_nonfinite,
        infer_options=True,
        **options,
    )
    meta["backbone_only"] = args.backbone_only
    if args.backbone_only:
        model = models.create(args.arch, num_classes=args.num_classes, **options)
        options_o0 = cpu.init_compiler_options(jax.default_backend())  # a one-off program: compile it fast
        fresh = models.init_variables(model, jax.random.PRNGKey(args.seed), compiler_options=options_o0)
        fresh = jax.tree.map(np.asarray, fresh)
        variables = merge_backbone(fresh, variables)
        meta.update(num_classes=args.num_classes, init_seed=args.seed)
    checkpoints.save_variables(args.out, variables, meta, overwrite=args.overwrite)

    print(f"Converted {args.torch_checkpoint} -> {os.path.abspath(args.out)}")
    print(
        f"  model {args.arch}, {meta['num_classes']} classes, {_count(variables['params']):,} parameters "
        f"({_count(variables.get('batch_stats', {})):,} batch statistics)"
    )
    chosen = meta["model_options"]
    read = [o for o in chosen if o not in options]
    print(
        "  model options: "
        + (", ".join(f"{k}={v!r}" for k, v in chosen.items()) or "the defaults")
        + (f" (read from the checkpoint: {', '.join(read)})" if read else "")
    )
    print(
        f"  key convention {meta['convention']}, vector order {meta['vector_order']}"
        + (f", backbone only (head/classifier freshly initialised, seed {args.seed})" if args.backbone_only else "")
    )
    src = ", ".join(f"{k} {meta[k]}" for k in ("arch", "epoch", "best_prec1", "best_acc1") if k in meta)
    print(f"  source: {src or 'bare state_dict'}")
    ignored = meta.get("ignored_keys", [])
    if ignored:
        more = " ..." if len(ignored) > 8 else ""
        print(f"  ignored {len(ignored)} checkpoint keys: {', '.join(ignored[:8])}{more}")
    return 0
