"""glibc malloc tunables for XLA:CPU's buffers (Linux, glibc >= 2.35).

XLA:CPU allocates the buffers of every executed program afresh and returns them after the
call, so every train step first-touches hundreds of MiB page by page. glibc's
`glibc.malloc.hugetlb=1` makes malloc ask for transparent huge pages (2 MiB) instead. glibc
reads tunables only at process start, so `reexec_with_hugepages` re-executes the command
with the tunable set. `tune_for_cpu_backend` does so only when JAX will run on the CPU:
accelerator hosts are never re-executed. Imports only the standard library.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pkgutil
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
# For benchmarks: glibc keeps freed memory for reuse (one arena, no mmap, never trim the
# heap), what PyTorch users on CPU get from jemalloc or tcmalloc.
KEEP_FREED_MEMORY = (
    "glibc.malloc.arena_max=1",
    "glibc.malloc.mmap_max=0",
    "glibc.malloc.trim_threshold=68719476736",
)
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
# Modules that give JAX a GPU or TPU backend besides the `jax_plugins` namespace packages.
_ACCELERATOR_MODULES = ("libtpu", "libtpu_nightly", "jaxlib.cuda", "jaxlib.rocm")


def _glibc_version():
    """(major, minor) of the glibc this process runs (asked of the library itself), or None."""
    try:
        lib, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # e.g. "glibc 2.36"
        major, minor = (int(p) for p in version.split(".")[:2])
    except (AttributeError, ValueError, OSError):  # not glibc, or no confstr here
        return None
    return (major, minor) if lib == "glibc" else None


def _tunables() -> dict:
    """This process's GLIBC_TUNABLES ("name=value:name=value") as {name: value}."""
    pairs = (t.partition("=") for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t)
    return {name: value for name, _, value in pairs}


def keeps_freed_memory() -> bool:
    """Whether this process runs with every `KEEP_FREED_MEMORY` tunable set as given."""
    current = _tunables()
    wanted = (t.partition("=") for t in KEEP_FREED_MEMORY)
    return _glibc_version() is not None and all(current.get(name) == value for name, _, value in wanted)


def _thp_mode() -> str:
    """The kernel's THP mode: 'always', 'madvise' or 'never' ('' if unknown)."""
    try:
        with open(_THP_MODE) as f:
            text = f.read()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else ""


def hugepages_enabled() -> bool:
    """Whether this process's large allocations get transparent huge pages."""
    mode = _thp_mode()
    value = _tunables().get("glibc.malloc.hugetlb")
    return mode == "always" or (mode == "madvise" and bool(value) and value.isdigit() and value != "0")


def jax_runs_on_cpu_only() -> bool:
    """Whether JAX in this process can only get the CPU backend, decided without starting JAX.

    True when JAX_PLATFORMS names only 'cpu', or when it is unset and no GPU/TPU support is
    installed (no `jax_plugins` package or entry point, no libtpu, no CUDA/ROCm jaxlib).
    """
    platforms = os.environ.get("JAX_PLATFORMS") or os.environ.get("JAX_PLATFORM_NAME") or ""
    if platforms:
        return all(p.strip() == "cpu" for p in platforms.split(",") if p.strip())
    if importlib.metadata.entry_points(group="jax_plugins"):
        return False
    try:
        namespace = importlib.util.find_spec("jax_plugins")
    except (ImportError, ValueError):
        namespace = None
    if namespace is not None and any(pkgutil.iter_modules(namespace.submodule_search_locations or [])):
        return False
    for name in _ACCELERATOR_MODULES:
        try:
            if importlib.util.find_spec(name) is not None:
                return False
        except (ImportError, ValueError):  # a parent package is missing
            continue
    return True


def reexec_with_tunables(*tunables: str) -> None:
    """Re-execute this Python command with `tunables` ("name=value") added to GLIBC_TUNABLES.

    Tunables whose name is already set keep their value; returns without re-executing when
    all are set, or when the C library is not glibc. Call it before importing jax.
    """
    current = _tunables()
    missing = [t for t in tunables if t.partition("=")[0] not in current]
    if not missing or not sys.platform.startswith("linux") or _glibc_version() is None:
        return
    env = os.environ
    setting = ":".join(t for t in [env.get("GLIBC_TUNABLES", "")] + missing if t)
    argv = list(getattr(sys, "orig_argv", [sys.executable] + sys.argv))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + argv[1:], dict(env, GLIBC_TUNABLES=setting))


def reexec_with_hugepages() -> None:
    """Re-execute this Python command with `glibc.malloc.hugetlb=1`, where that has an effect.

    Does nothing when the tunable is already set, when the kernel's THP mode is not "madvise"
    (with "always" every large block gets huge pages anyway), when glibc is older than 2.35,
    or when `GG_JAX_HUGEPAGES=0`. Nothing done in the process before it is kept.
    """
    if os.environ.get("GG_JAX_HUGEPAGES", "1") == "0" or not sys.platform.startswith("linux"):
        return
    if _thp_mode() != "madvise" or (_glibc_version() or (0, 0)) < (2, 35):
        return
    reexec_with_tunables(TUNABLE)


def tune_for_cpu_backend() -> bool:
    """`reexec_with_hugepages()` when JAX will run on the CPU only; never on GPU/TPU hosts.

    Returns whether this process is a CPU-only one that runs with huge pages for malloc.
    """
    if not jax_runs_on_cpu_only():
        return False
    reexec_with_hugepages()
    return hugepages_enabled()
