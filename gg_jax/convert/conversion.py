"""PyTorch state_dicts <-> the variables of `gg_jax.models.create(name, ...)`.

`convert_state_dict` (and `from_torch`, its variables alone) reads a state_dict in any key
convention, `to_torch` writes one, `torch_layout` lists the keys and shapes it writes, and
`load_torch_checkpoint` reads a `.pth` file and converts it. NumPy in, NumPy out: only reading
a file needs torch.
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from gg_jax import checkpoints, models
from gg_jax.convert import keys, layout, pth, structure, vector
from gg_jax.convert.errors import CheckpointMismatchError, ConversionError, NonfiniteWeightsError


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
    options: the model options the variables are for (`create(name, **options)`): those
      given, and with `infer_options` those read from the state_dict.
    """

    variables: dict[str, Any]
    convention: str
    vector_order: str
    num_classes: int | None
    ignored_keys: list[str]
    nonfinite: dict[str, str] = dataclasses.field(default_factory=dict)
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


def _as_numpy(value, key: str) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor (no torch import)
        t = value.detach().cpu()
        if str(t.dtype) in ("torch.bfloat16", "torch.float16"):
            t = t.float()
        return t.numpy()
    arr = np.asarray(value)
    if arr.dtype == object:
        raise TypeError(
            f"state_dict[{key!r}] is not a numeric array (got {type(value).__name__}); "
            "pass a flat {name: tensor} state_dict."
        )
    return arr


def _nonfinite(values: Mapping[str, np.ndarray], names: Mapping[str, str]) -> dict[str, str]:
    """names[key] -> "N NaN, M inf" for the arrays of `values` that hold NaN or inf."""
    out = {}
    for key, arr in values.items():
        if not np.issubdtype(arr.dtype, np.floating) or np.isfinite(arr).all():
            continue
        counts = [(int(np.isnan(arr).sum()), "NaN"), (int(np.isinf(arr).sum()), "inf")]
        out[names.get(key, key)] = ", ".join(f"{n} {what}" for n, what in counts if n)
    return out


def check_nonfinite(res: ConversionResult, source: str = "The checkpoint", allow: bool = True) -> ConversionResult:
    """`res`, with a logged warning naming its NaN/inf tensors; `NonfiniteWeightsError` unless `allow`."""
    if not res.nonfinite:
        return res
    shown = "; ".join(f"{k}: {v}" for k, v in list(res.nonfinite.items())[:5])
    more = f"; and {len(res.nonfinite) - 5} more" if len(res.nonfinite) > 5 else ""
    message = (
        f"{source} holds NaN or inf values in {len(res.nonfinite)} tensor(s) ({shown}{more}); a model with these "
        "weights computes NaN (the run that saved them had probably diverged)."
    )
    if not allow:
        raise NonfiniteWeightsError(
            f"{message} Nothing was converted; pass --allow_nonfinite (allow_nonfinite=True) to convert anyway."
        )
    logging.getLogger(__name__).warning("%s", message)
    return res


def _given_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Options as `create` takes them: None is the model's default."""
    return {k: v for k, v in options.items() if v is not None}


def _num_classes(num_classes, shapes, backbone_only: bool) -> int:
    if num_classes is None:
        fc = shapes.get("fc.weight", ())
        # backbone_only ignores fc; without a 2-d fc.weight, it is reported missing or mis-shaped.
        num_classes = fc[0] if len(fc) == 2 and not backbone_only else 1
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ConversionError(f"num_classes must be a positive int, got {num_classes!r}.")
    return int(num_classes)


def _mismatch_message(name, num_classes, options, convention, problems, shapes, entries, found, backbone_only):
    """The `CheckpointMismatchError` text: every problem by name, then what to do where the keys show it."""
    lines = [
        f"The PyTorch state_dict does not match {name!r} (num_classes={num_classes}"
        + "".join(f", {k}={v!r}" for k, v in sorted(options.items()))
        + f"; key convention {convention!r}):"
    ]
    for title, items in problems:
        if items:
            lines.append(f"  {title} ({len(items)}):")
            lines.extend(f"    {k}" for k in items)
    hints = [h for h in [structure.depth_hint(shapes, name)] if h]
    if not backbone_only and convention == "torchvision" and models.parse_name(name)[1] != "gap":
        hints.append(
            "this looks like a torchvision ResNet (backbone + fc only): to fine-tune it, "
            "convert with backbone_only=True (--backbone_only) and merge it into a fresh "
            "model with merge_backbone"
        )
    hints += structure.option_hints(found, structure.head_options({e.key: e.torch_shape for e in entries}, name))
    if not backbone_only and shapes.get("fc.weight", (num_classes,))[:1] != (num_classes,):
        hints.append("num_classes is read from fc.weight unless you pass it")
    if hints:
        lines.append("Hints: " + "; ".join(hints) + ".")
    return "\n".join(lines)


def convert_state_dict(
    state_dict: Mapping[str, Any],
    name: str,
    num_classes: int | None = None,
    *,
    backbone_only: bool = False,
    convention: str | None = None,
    vector_order: str | None = None,
    infer_options: bool = False,
    **options,
) -> ConversionResult:
    """`from_torch` with the details (detected convention, ignored keys, options) returned too.

    infer_options: take the head options the state_dict's tensors fix (`num_blocks`,
      `reweighting`, `hidden`, `reduction_dim`) from it where not given; `ConversionResult.options`
      holds them. Without it, a state_dict that needs them is a `CheckpointMismatchError`
      naming the option to pass.
    """
    models.parse_name(name)  # unknown names: ValueError listing the valid ones
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of key -> array, got {type(state_dict).__name__}.")
    options = _given_options(options)
    convention = keys.detect_convention(state_dict, name) if convention is None else keys.check_convention(convention)
    vector_order = keys.vector_order(convention, vector_order)

    source: dict[str, tuple[str, Any]] = {}  # canonical key -> (original key, value)
    ignored = []
    for orig, key in keys.strip_wrappers(list(state_dict)).items():
        if key.endswith("num_batches_tracked"):
            ignored.append(orig)
        else:
            source[keys.rename(key, convention, inverse=True)] = (orig, state_dict[orig])
    shapes = {key: tuple(np.shape(value)) for key, (_, value) in source.items()}
    found = {} if backbone_only else structure.head_options(shapes, name)
    if infer_options:
        options = {**found, **options}
    num_classes = _num_classes(num_classes, shapes, backbone_only)
    entries = layout.layout(name, num_classes, options)
    if not structure.is_resnet(shapes):
        raise CheckpointMismatchError(structure.not_a_resnet(list(state_dict), name, convention))
    if backbone_only:
        entries = tuple(e for e in entries if e.backbone)
    expected = {e.key for e in entries}

    missing, wrong_shape = [], []
    values: dict[str, np.ndarray] = {}
    original_keys: dict[str, str] = {}
    for e in entries:
        if e.key not in source:
            missing.append(keys.rename(e.key, convention))
            continue
        orig, value = source[e.key]
        if shapes[e.key] != e.torch_shape:
            wrong_shape.append(f"{orig}: checkpoint {shapes[e.key]}, model expects {e.torch_shape}")
            continue
        values[e.key] = _as_numpy(value, orig)
        original_keys[e.key] = orig
    unexpected = []
    for key, (orig, _) in source.items():
        if key not in expected:
            (ignored if backbone_only and not layout.is_backbone_key(key) else unexpected).append(orig)
    if missing or unexpected or wrong_shape:
        problems = [("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong_shape)]
        raise CheckpointMismatchError(
            _mismatch_message(name, num_classes, options, convention, problems, shapes, entries, found, backbone_only)
        )

    by_path: dict[tuple[str, tuple[str, ...]], list[tuple[int | None, np.ndarray]]] = {}
    for e in entries:
        arr = values[e.key]
        if e.kind == "conv":
            arr = arr.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif e.kind == "linear":
            arr = arr.T
        by_path.setdefault((e.collection, e.path), []).append((e.scan_index, arr))
    flat: dict[str, dict[tuple[str, ...], np.ndarray]] = {"params": {}, "batch_stats": {}}
    for (col, path), items in by_path.items():
        arr = items[0][1] if items[0][0] is None else np.stack([a for _, a in sorted(items, key=lambda x: x[0])])
        flat[col][path] = np.ascontiguousarray(arr, dtype=np.float32)
    if not backbone_only and layout.vector_head(name):
        target = "lower" if options.get("lower_triangle", True) else "upper"
        flat["params"][("fc", "kernel")] = vector.reorder(flat["params"][("fc", "kernel")], vector_order, target)

    return ConversionResult(
        variables={col: traverse_util.unflatten_dict(f) for col, f in flat.items() if f},
        convention=convention,
        vector_order=vector_order,
        num_classes=None if backbone_only else num_classes,
        ignored_keys=ignored,
        nonfinite=_nonfinite(values, original_keys),
        options=options,
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
      mis-shaped key by name, with the option or model to use where the state_dict shows
      it; ConversionError (a ValueError) for a model or option that cannot be converted.
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
    return check_nonfinite(res, "The state_dict").variables


def merge_backbone(variables: Mapping[str, Any], backbone: Mapping[str, Any]) -> dict[str, Any]:
    """`variables` with the backbone entries (`from_torch(..., backbone_only=True)`) replaced.

    Everything else (head, classifier) keeps its value. Every entry of `backbone` must
    exist in `variables` with the same shape (`CheckpointMismatchError` otherwise).
    """
    return checkpoints.merge(variables, backbone, partial_source=True)[0]


def _torch_order(entries, convention: str) -> list[tuple[layout.Entry | None, str]]:
    """`(entry, key)` in the PyTorch state_dict's order; entry None for a `num_batches_tracked`."""
    out: list[tuple[layout.Entry | None, str]] = []
    for e in entries:
        out.append((e, keys.rename(e.key, convention)))
        if e.key.endswith(".running_var"):
            out.append((None, keys.rename(keys.counter_key(e.key), convention)))
    if convention in keys.NEWMODEL_CONVENTIONS:  # Newmodel's order: features, classifier, representation
        group = lambda k: 0 if k.startswith("features.") else 1 if k.startswith("classifier.") else 2  # noqa: E731
        out.sort(key=lambda item: group(item[1]))
    return out


def torch_layout(
    name: str, num_classes: int = 1000, *, convention: str | None = None, **options
) -> list[tuple[str, tuple[int, ...]]]:
    """`[(key, shape), ...]` of the PyTorch state_dict `to_torch` writes, in PyTorch's order.

    For "*_3g" this is the released 3G-Net's layout (`layout.json`).
    """
    convention = keys.check_convention(convention or keys.default_convention(name))
    entries = layout.layout(name, num_classes, _given_options(options))
    return [(key, e.torch_shape if e else ()) for e, key in _torch_order(entries, convention)]


def _num_classes_of(variables) -> int:
    try:
        return int(np.shape(variables["params"]["fc"]["kernel"])[1])
    except (KeyError, TypeError, IndexError) as e:
        raise ConversionError("variables have no params/fc/kernel; pass the variables of a gg_jax model.") from e


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
    convention = keys.check_convention(convention or keys.default_convention(name))
    vector_order = keys.vector_order(convention, vector_order)
    options = _given_options(options)
    entries = layout.layout(name, _num_classes_of(variables), options)
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
    fc_kernel = np.asarray(flat["params"][("fc", "kernel")])
    if layout.vector_head(name):
        fc_kernel = vector.reorder(fc_kernel, "lower" if options.get("lower_triangle", True) else "upper", vector_order)
    out: dict[str, np.ndarray] = {}
    for e, key in _torch_order(entries, convention):
        if e is None:
            out[key] = np.zeros((), np.int64)
            continue
        arr = fc_kernel if e.path == ("fc", "kernel") else np.asarray(flat[e.collection][e.path])
        if e.scan_index is not None:
            arr = arr[e.scan_index]
        if e.kind == "conv":
            arr = arr.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        elif e.kind == "linear":
            arr = arr.T
        if tuple(arr.shape) != e.torch_shape:
            raise CheckpointMismatchError(
                f"{e.collection}/{'/'.join(e.path)} has shape {np.shape(flat[e.collection][e.path])}, "
                f"expected the PyTorch shape {e.torch_shape} after transposing."
            )
        out[key] = np.ascontiguousarray(arr, dtype=np.float32)
    return out


def load_torch_checkpoint(
    path: str,
    name: str,
    num_classes: int | None = None,
    *,
    backbone_only: bool = False,
    allow_nonfinite: bool = True,
    **kwargs,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a `.pth` / `.pth.tar` checkpoint and convert it for `create(name, ...)`.

    The file may be a released-style dict (`state_dict`, `epoch`, `arch`, `best_prec1`,
    `optimizer`, ...) or a bare state_dict. It is read with
    `torch.load(path, map_location='cpu', weights_only=True)`: files that need arbitrary
    Python objects are refused (`UnsafeCheckpointError`) and nothing in them is executed.
    `kwargs` are `convert_state_dict`'s (`convention`, `vector_order`, `infer_options`, and
    the model options).

    Weights holding NaN or inf are converted with a logged warning naming them, or refused
    (`NonfiniteWeightsError`) with `allow_nonfinite=False`.

    Returns:
      `(variables, meta)`: the variables as `from_torch` returns them, and meta with
      "model", "num_classes", "model_options" (`create`'s options for these variables),
      "source" (the path), "convention", "vector_order", "ignored_keys" (the checkpoint's
      keys not converted, if any, `num_batches_tracked` aside) and the file's "epoch",
      "arch", "best_prec1" where present.

    Raises:
      CheckpointNotFoundError, UnreadableCheckpointError, UnsafeCheckpointError,
      MissingDependencyError (no torch), and `convert_state_dict`'s errors: each a
      `gg_jax.errors.UserError`.
    """
    models.parse_name(name)
    path = os.fspath(path)
    state_dict, file_meta = pth.read_state_dict(path)
    res = convert_state_dict(state_dict, name, num_classes, backbone_only=backbone_only, **kwargs)
    check_nonfinite(res, repr(path), allow=allow_nonfinite)
    meta = {
        "model": name,
        "num_classes": res.num_classes,
        "model_options": dict(res.options),
        "source": os.path.abspath(path),
        "convention": res.convention,
        "vector_order": res.vector_order,
    }
    ignored = [k for k in res.ignored_keys if not k.endswith("num_batches_tracked")]
    if ignored:
        meta["ignored_keys"] = ignored
    meta.update(file_meta)
    return res.variables, meta
