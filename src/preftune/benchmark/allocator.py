"""The memory allocator the benchmark's children run with: glibc's malloc (``system``), or tcmalloc or jemalloc
preloaded (``LD_PRELOAD``) into every child, every system alike, so a comparison stays side by side.

Why it matters on a CPU (bench/README.md, "The allocator"): glibc hands every allocation over its (adaptive, at most
32 MiB) threshold to a fresh ``mmap`` and returns it on free, so a training step that allocates and frees large
tensors pays the kernel's zero-filled page faults on every step, and its freed heap memory fragments. Each child
checks, in its own ``/proc/self/maps``, that the asked allocator is the one it runs with.
"""

from __future__ import annotations

import ctypes.util
import os
import sys

# the libraries' link names, in order of preference (tcmalloc_minimal: tcmalloc without the heap profiler)
ALLOCATORS: dict[str, tuple[str, ...]] = {"system": (), "tcmalloc": ("tcmalloc_minimal", "tcmalloc"),
                                          "jemalloc": ("jemalloc",)}
INSTALL = {"tcmalloc": "Debian/Ubuntu: apt install libtcmalloc-minimal4; Fedora: dnf install gperftools-libs",
           "jemalloc": "Debian/Ubuntu: apt install libjemalloc2; Fedora: dnf install jemalloc"}


def allocator_library(name: str) -> str | None:
    """The library to preload for ``name`` (None for ``system``); ValueError if it is not installed."""
    if name not in ALLOCATORS:
        raise ValueError(f"--allocator {name!r}: one of {', '.join(ALLOCATORS)}")
    if name == "system":
        return None
    if not sys.platform.startswith("linux"):
        raise ValueError(f"--allocator {name}: preloading an allocator is supported on Linux only")
    for link_name in ALLOCATORS[name]:
        found = ctypes.util.find_library(link_name)
        if found:
            return found
    raise ValueError(f"--allocator {name}: no lib{ALLOCATORS[name][0]} on this machine ({INSTALL[name]})")


def preload_env(library: str | None, env: dict[str, str]) -> dict[str, str]:
    """``env`` with ``library`` (``allocator_library``'s answer, resolved once per benchmark) first in
    ``LD_PRELOAD``; unchanged for None (``system``)."""
    if library is None:
        return env
    return {**env, "LD_PRELOAD": " ".join(filter(None, (library, env.get("LD_PRELOAD", ""))))}


def check_loaded(asked: str) -> str:
    """The allocator this process runs with; RuntimeError if it is not the one asked for."""
    from preftune.train.rundir import loaded_allocator  # imports torch: only in the child that checks

    loaded = loaded_allocator()
    if asked != "system" and loaded != asked:
        raise RuntimeError(f"asked for the {asked} allocator, but this process runs with {loaded}'s (LD_PRELOAD="
                           f"{os.environ.get('LD_PRELOAD', '')!r})")
    return loaded
