"""The errors of `gg_jax.convert`: each says what to change, and each is a `gg_jax.errors.UserError`.

`python -m gg_jax.convert` prints every one of them as one `error:` line and exits with status 1
(`gg_jax.cli.run_tool`). A state_dict that does not fit the model is a
`gg_jax.checkpoints.CheckpointMismatchError`, a missing file a `CheckpointNotFoundError`, an
existing `--out` a `CheckpointExistsError`, and a missing PyTorch a
`gg_jax.errors.MissingDependencyError`.
"""

from __future__ import annotations

from gg_jax.checkpoints.variables import CheckpointMismatchError
from gg_jax.errors import UserError

__all__ = [
    "CheckpointMismatchError",
    "ConversionError",
    "NonfiniteWeightsError",
    "UnreadableCheckpointError",
    "UnsafeCheckpointError",
]


class ConversionError(UserError, ValueError):
    """What was asked cannot be converted: a model without a PyTorch layout, an option out of
    range, an unknown convention or vector order, a bad number of classes."""


class UnsafeCheckpointError(UserError, ValueError):
    """The file needs arbitrary Python objects to be unpickled; we refuse to execute it."""


class UnreadableCheckpointError(UserError, ValueError):
    """The file is no PyTorch checkpoint that can be read: corrupt, truncated, not written by
    `torch.save`, or without a state_dict inside."""


class NonfiniteWeightsError(UserError, ValueError):
    """Weights hold NaN or inf (a model with them computes NaN); the message names the tensors."""
