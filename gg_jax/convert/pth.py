"""Reading `.pth` / `.pth.tar` files safely: tensors, numbers and dicts, never code.

`read_state_dict(path)` loads a file with `torch.load(path, map_location='cpu', weights_only=True)`
and returns its state_dict and the file's `epoch`, `arch`, `best_prec1`. A file that needs
arbitrary Python objects is refused (`UnsafeCheckpointError`), with the lines that re-save its
state_dict for a user who trusts it. Only this module imports torch, and only when a file is read.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from gg_jax.checkpoints.variables import CheckpointNotFoundError
from gg_jax.convert.errors import UnreadableCheckpointError, UnsafeCheckpointError
from gg_jax.errors import MissingDependencyError

_RESAVE_SNIPPET = (
    "    import torch\n"
    "    ckpt = torch.load(PATH, map_location='cpu', weights_only=False)  # only if you trust PATH\n"
    "    sd = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else ckpt.state_dict()\n"
    "    torch.save({k: v for k, v in sd.items() if torch.is_tensor(v)}, 'state_dict_only.pth')"
)
# Entries of a released-style dict that hold the state_dict, and the numbers kept from it.
_STATE_DICT_ENTRIES = ("state_dict", "model_state_dict", "model")
_META_ENTRIES = ("epoch", "arch", "best_prec1", "best_acc1")


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


def _import_torch(path: str):
    try:
        import torch
    except ImportError as e:
        raise MissingDependencyError(
            f"Reading {path!r} needs PyTorch (pip install torch; the CPU build is enough). "
            "gg_jax itself does not need it: from_torch also accepts a dict of NumPy arrays."
        ) from e
    return torch


def read_pth(path: str):
    """The object `torch.save` wrote to `path`, unpickled with `weights_only=True`."""
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"PyTorch checkpoint {path!r} does not exist.")
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"PyTorch checkpoint {path!r} is not a file.")
    torch = _import_torch(path)
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
        raise UnreadableCheckpointError(
            f"{path!r} is not a readable PyTorch checkpoint: torch.load(..., weights_only=True) "
            "failed (the file is corrupt or truncated, was not written by torch.save, or uses "
            f"pickle features the safe loader refuses): {_unpickler_detail(msg)}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UnreadableCheckpointError(
            f"{path!r} is not a readable PyTorch checkpoint (corrupt, truncated or not written by torch.save): {e}"
        ) from None


def _is_tensor_like(v) -> bool:
    return hasattr(v, "shape") and (hasattr(v, "detach") or isinstance(v, np.ndarray))


def extract_state_dict(obj, path: str) -> tuple[Mapping[str, Any], dict[str, Any]]:
    """(state_dict, meta) from a released-style dict or a bare state_dict."""
    if not isinstance(obj, Mapping):
        raise UnreadableCheckpointError(
            f"{path!r} holds a {type(obj).__name__}, not a state_dict or a dict with 'state_dict'."
        )
    state_dict, meta = None, {}
    for key in _STATE_DICT_ENTRIES:
        if key in obj and isinstance(obj[key], Mapping):
            meta = {k: _to_python(obj[k]) for k in _META_ENTRIES if k in obj}
            state_dict, meta = obj[key], {k: v for k, v in meta.items() if v is not None}
            break
    else:
        if obj and all(_is_tensor_like(v) for v in obj.values()):
            state_dict = obj
    if state_dict is None:
        raise UnreadableCheckpointError(
            f"{path!r} has no 'state_dict' entry and is not a state_dict itself "
            f"(top-level keys: {', '.join(map(str, list(obj)[:20]))})."
        )
    odd = [
        f"{k!r} ({type(v).__name__})" for k, v in state_dict.items() if not (isinstance(k, str) and _is_tensor_like(v))
    ]
    if odd:
        raise UnreadableCheckpointError(
            f"The state_dict in {path!r} is not a flat {{name: tensor}} dict: {', '.join(odd[:8])}"
            + (f" and {len(odd) - 8} more" if len(odd) > 8 else "")
            + "."
        )
    return state_dict, meta


def read_state_dict(path: str) -> tuple[Mapping[str, Any], dict[str, Any]]:
    """(state_dict, the file's `epoch`/`arch`/`best_prec1`/`best_acc1`) of a `.pth` file."""
    return extract_state_dict(read_pth(path), path)
