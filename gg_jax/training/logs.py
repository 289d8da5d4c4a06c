"""The console of a run: what the libraries log that a user cannot act on is left out.

`quiet_library_logs()` drops Orbax's INFO logs (warnings stay), its tracebacks of storage
errors that the trainer reports in one line (`gg_jax.checkpoints.CheckpointSaveError`), and
the "Event loop is closed" tracebacks that TensorStore prints for each write still running
when such a save failed.
"""

from __future__ import annotations

import logging
import sys

from absl import logging as absl_logging

# Orbax warnings about what gg_jax does on purpose: managers opened read-only (evaluation,
# loading), and a step directory without Orbax's metadata (which the damaged-checkpoint error names).
_EXPECTED_ORBAX_WARNINGS = ("Given directory is read only", "CheckpointManagerOptions.read_only=True", "Metadata file")


class _DropLibraryInfo(logging.Filter):
    """Orbax's records: INFO and DEBUG (very chatty), the warnings of `_EXPECTED_ORBAX_WARNINGS`,
    and the tracebacks of failed saves due to the storage (disk full, ...)."""

    def filter(self, record) -> bool:
        if "/orbax/" not in record.pathname.replace("\\", "/"):
            return True
        if record.levelno < logging.WARNING or str(record.msg).startswith(_EXPECTED_ORBAX_WARNINGS):
            return False
        from gg_jax.checkpoints.writer import storage_error

        error = record.exc_info[1] if record.exc_info else None
        return error is None or storage_error(error) is None


def _closed_loop_callback(error, tb) -> bool:
    """Whether `error` is asyncio's "Event loop is closed" raised by `call_soon_threadsafe`
    called straight from native code (`tb` starts there): TensorStore completing a write
    for an Orbax save whose event loop a failed write already closed."""
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed" and tb is not None):
        return False
    return tb.tb_frame.f_code.co_name == "call_soon_threadsafe"


def quiet_library_logs() -> None:
    """Installs the filter on absl's handler and the hooks that drop the closed-loop tracebacks (once),
    and leaves out JAX's note on each accelerator backend this host does not have."""
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    # On absl's handler (absl programs) and on absl's logger (Orbax logs through it; other programs
    # print its records with Python's own handler).
    for target in (absl_logging.get_absl_handler(), logging.getLogger("absl")):
        if not any(isinstance(f, _DropLibraryInfo) for f in target.filters):
            target.addFilter(_DropLibraryInfo())
    if getattr(sys.excepthook, "_gg_jax_quiet", False):
        return
    excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

    def quiet_excepthook(exc_type, exc, tb):
        if not _closed_loop_callback(exc, tb):
            excepthook(exc_type, exc, tb)

    def quiet_unraisablehook(unraisable):
        if not _closed_loop_callback(unraisable.exc_value, unraisable.exc_traceback):
            unraisablehook(unraisable)

    quiet_excepthook._gg_jax_quiet = True
    sys.excepthook, sys.unraisablehook = quiet_excepthook, quiet_unraisablehook
