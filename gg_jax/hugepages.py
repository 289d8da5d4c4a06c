"""Transparent huge pages for XLA:CPU's buffers (Linux, glibc >= 2.35).

XLA:CPU allocates the buffers of every executed program afresh (`malloc` -> `mmap` for
large sizes) and returns them after the call, so every train step first-touches, page by
page, hundreds of MiB: ~220,000 minor page faults per ResNet-50 step at batch 4. With
glibc's `glibc.malloc.hugetlb=1` tunable malloc asks for transparent huge pages
(`madvise(MADV_HUGEPAGE)`): 2 MiB pages, few faults, fewer TLB misses. Measured on the
2-core CI-class VM: the resnet50_3g train step (batch 4, float32) 1.15 -> 1.04 s
(`python benchmarks/bench_train_step.py --no_hugepages` against the default).

glibc reads tunables only at process start, so `reexec_with_hugepages` re-executes the
current command with the tunable set (the same process id, arguments and environment
otherwise). It does nothing when the tunable is already set, on other platforms, when the
kernel's THP mode is "never", or when `GG_JAX_HUGEPAGES=0`.

`KEEP_FREED_MEMORY` goes further, for benchmarks only: glibc keeps freed memory for reuse
(`reexec_with_tunables(*KEEP_FREED_MEMORY)`), so neither XLA:CPU's per-step buffer (one
~900 MiB allocation per resnet50_3g step at batch 4, made on a worker thread) nor
PyTorch's tensors are mapped, faulted in and zeroed again every step: what PyTorch users
on CPU get from jemalloc or tcmalloc. `train.py` does not set it: gg_jax's step was no
faster with it (about 2 % slower on the 2-core VM), every thread's allocations, the input
pipeline's included, go to one arena, and memory is never returned to the system.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
# One arena: other threads' arenas mmap large blocks whatever mmap_max says; no mmap;
# never trim the heap (64 GiB threshold).
KEEP_FREED_MEMORY = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0", "glibc.malloc.trim_threshold=68719476736")
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_version():
    """(major, minor) of the glibc this process runs (asked of the library itself), or None."""
    try:
        lib, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # e.g. "glibc 2.36"
        major, minor = (int(p) for p in version.split(".")[:2])
    except (AttributeError, ValueError, OSError):  # not glibc, or no confstr here
        return None
    return (major, minor) if lib == "glibc" else None


def _glibc_has_hugetlb_tunable() -> bool:
    """Whether the C library this process runs is glibc >= 2.35."""
    return (_glibc_version() or (0, 0)) >= (2, 35)


def _tunables() -> dict:
    """This process's GLIBC_TUNABLES ("name=value:name=value") as {name: value}."""
    pairs = (t.partition("=") for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t)
    return {name: value for name, _, value in pairs}


def keeps_freed_memory() -> bool:
    """Whether this process runs with every `KEEP_FREED_MEMORY` tunable set as given."""
    current = _tunables()
    wanted = (t.partition("=") for t in KEEP_FREED_MEMORY)
    return _glibc_version() is not None and all(current.get(name) == value for name, _, value in wanted)


def _hugetlb_tunable():
    """The value of `glibc.malloc.hugetlb` in this process's GLIBC_TUNABLES, or None."""
    value = _tunables().get("glibc.malloc.hugetlb")
    return value if value and value.isdigit() else None


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
    return mode == "always" or (mode == "madvise" and _hugetlb_tunable() not in (None, "0"))


def reexec_with_hugepages() -> None:
    """Re-execute this Python command with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, if useful.

    Call it first thing in a script's main (before importing jax: nothing done before it
    is kept). Returns only when no re-execution is needed or possible.
    """
    if os.environ.get("GG_JAX_HUGEPAGES", "1") == "0" or not sys.platform.startswith("linux"):
        return
    if _thp_mode() != "madvise" or not _glibc_has_hugetlb_tunable():
        return
    reexec_with_tunables(TUNABLE)


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
