"""The errors of `gg_jax.pretrained`: one line each, saying what to do; every one a `gg_jax.errors.UserError`.

`python -m gg_jax.pretrained`, `evaluate.py` and `train.py` print them as one `error:` line and
exit with status 1. A missing gdown or PyTorch is a `gg_jax.errors.MissingDependencyError`.
"""

from __future__ import annotations

from gg_jax.errors import UserError

__all__ = ["CacheError", "ChecksumError", "DownloadError", "NotACheckpointError", "UnknownPretrainedError"]


class UnknownPretrainedError(UserError, ValueError):
    """No loadable registry entry has that name (the message lists them, or says why it is not loadable)."""


class DownloadError(UserError, OSError):
    """The file could not be downloaded: no network, an HTTP error, an interrupted transfer."""


class NotACheckpointError(UserError, ValueError):
    """What was downloaded (or given) is no PyTorch checkpoint of the entry: an HTML page, another file."""


class ChecksumError(UserError, ValueError):
    """The file's sha256 is not the registry's, or not the one recorded at its first download."""


class CacheError(UserError, OSError):
    """The cache directory cannot be written: not writable, or the disk is full."""


def one_line(text: str, limit: int = 600) -> str:
    """`text` on one line (its lines joined by ' '), cut at `limit` characters."""
    flat = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
