"""Host memory on CPU-only machines: keep freed memory in the process instead of page-faulting it back every step.

XLA:CPU allocates each execution's buffers afresh (a `small` train step at batch 4: ~3 GB). glibc's malloc serves
blocks that large with mmap and unmaps them when they are freed, so every step page-faults its whole working set
again: ~800k faults and 1.5-2 s of kernel time per step on the 2-core VM we measure on, and 4-5 s when other
memory was freed just before (in a VM the host takes freed pages back and must supply them again). With mmap off,
one arena and no trimming, freed memory stays in the process and later steps reuse it: train step 4.0 -> 3.2 s,
no faults once the heap has grown (first step or two). The costs, measured: the process keeps its peak memory
(peak RSS 4.7 -> 8.3 GB for that train step) and compiles take longer (train step 6.9 -> 8.5 s; threads share
one arena). Two arenas kept RSS at 5.5 GB but faulted again as soon as PyTorch shared the process (the bench).

glibc reads these settings (GLIBC_TUNABLES) only when a process starts, so the `glmv` command re-executes itself
once with them (`reexec_with_tuned_malloc`). Not done where an accelerator does the work (its memory is not
malloc's), on non-glibc systems, when GLIBC_TUNABLES already sets malloc, or with GLMV_HOST_MALLOC=system.
In a notebook or your own script, start Python with `GLIBC_TUNABLES=<TUNABLES>` to get the same.
"""
from __future__ import annotations

import glob
import os
import platform
import sys

TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736:glibc.malloc.arena_max=1"
ACCELERATOR_DEVICES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd")


def cpu_only(env: dict[str, str]) -> bool:
    """True if JAX will compute on the CPU: JAX_PLATFORMS says only cpu, or it is unset and no TPU/GPU device
    file exists."""
    platforms = env.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms == "cpu"
    return not any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICES)


def wants_tuned_malloc(env: dict[str, str]) -> bool:
    """Whether `reexec_with_tuned_malloc` should re-execute a process started with environment `env`."""
    return (sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
            and env.get("GLMV_HOST_MALLOC", "tuned") != "system"
            and "glibc.malloc" not in env.get("GLIBC_TUNABLES", "") and cpu_only(env))


def reexec_with_tuned_malloc(module: str, args: list[str]) -> None:
    """Replace this process by `python -m module *args` with `TUNABLES` added to GLIBC_TUNABLES, if
    `wants_tuned_malloc`; otherwise return. Call it before anything is computed (the process restarts)."""
    if not sys.executable or not wants_tuned_malloc(dict(os.environ)):
        return
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES", ""), TUNABLES]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *args], env)
