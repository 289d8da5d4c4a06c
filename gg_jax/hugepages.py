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
"""
from __future__ import annotations

import os
import re
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_has_hugetlb_tunable() -> bool:
    """Whether the C library this process runs is glibc >= 2.35 (asked of the library itself)."""
    try:
        lib, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # e.g. "glibc 2.36"
        major, minor = (int(p) for p in version.split(".")[:2])
    except (AttributeError, ValueError, OSError):  # not glibc, or no confstr here
        return False
    return lib == "glibc" and (major, minor) >= (2, 35)


def _hugetlb_tunable():
    """The value of `glibc.malloc.hugetlb` in this process's GLIBC_TUNABLES, or None."""
    found = re.search(r"glibc\.malloc\.hugetlb=([0-9]+)", os.environ.get("GLIBC_TUNABLES", ""))
    return found.group(1) if found else None


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
    env = os.environ
    if env.get("GG_JAX_HUGEPAGES", "1") == "0" or not sys.platform.startswith("linux"):
        return
    if _hugetlb_tunable() is not None or _thp_mode() != "madvise":
        return
    if not _glibc_has_hugetlb_tunable():
        return
    tunables = ":".join(t for t in (env.get("GLIBC_TUNABLES", ""), TUNABLE) if t)
    argv = list(getattr(sys, "orig_argv", [sys.executable] + sys.argv))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + argv[1:], dict(env, GLIBC_TUNABLES=tunables))
