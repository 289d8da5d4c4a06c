"""The base class of the errors a user fixes (config, data, workdir), in a module that imports nothing.

Each library error that means "change the config, the data or the workdir" derives from
`UserError` as well as from its builtin category (`ValueError`, `FileNotFoundError`, ...),
so that `train.py` and `evaluate.py` print its message once, without a traceback, and
exit with status 1, without importing the modules that define the errors.
"""

from __future__ import annotations


class UserError(Exception):
    """An error whose message says what to change; not a bug of gg_jax."""


class MissingDependencyError(UserError, ImportError):
    """An optional package (torch, matplotlib, gdown) is needed for what was asked; the message names it."""
