"""Peak extra memory of one call, on CUDA and on the CPU.

CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the bytes
allocated before the call: the peak of tensors alive *during* the call beyond its inputs.

CPU: there is no CPU counterpart of ``max_memory_allocated``, so the process's resident-set
high-water mark is used. Writing ``5`` to ``/proc/self/clear_refs`` resets the kernel's
``VmHWM`` to the current RSS; after the call ``VmHWM - RSS before`` is the peak of memory
*touched* during the call beyond what was resident before it. This counts everything: tensors
from torch's allocator and scratch buffers that kernels take straight from ``malloc`` (for
example the fused kernels' per-thread tiles, invisible to torch's profiler). To make it honest,
``malloc_trim(0)`` runs just before the call: glibc hands the pages of every freed block back to
the kernel (the top of each arena is released, free chunks inside it are ``madvise``d away), so
a buffer an earlier call freed is not resident any more and counts again when it is reused. Small
blocks (a page or less, kept in malloc's caches) may still be reused without counting; at the
sizes benchmarked they are noise. Where ``clear_refs`` is not writable (not Linux, restricted
containers) the fallback is torch's profiler (``profile_memory=True``): the peak of the running
sum of the allocations and frees torch's CPU allocator reports during the call (tensors only).

Only the measurement trims: malloc keeps its default, adaptive behaviour for the timings, the
allocator a user's process has. (Until 2026-11-30 the benchmark fixed glibc's thresholds with
``mallopt`` for the whole run instead, so every block of 64 KiB or more was a fresh ``mmap``
whose pages faulted in on each call; that slowed every backend's timings, the ones with more
scratch most: benchmarks/NOTES.md, entry 25.)
"""
import ctypes
import os
from typing import Callable, Optional, Tuple

import torch

def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def release_free_memory() -> bool:
    """glibc's ``malloc_trim(0)``: the pages of freed blocks go back to the kernel. True when called."""
    fn = getattr(_LIBC, "malloc_trim", None)
    if fn is None:
        return False
    fn(ctypes.c_size_t(0))
    return True


def _status_bytes() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                key, val = line.split(":", 1)
                out[key] = int(val.split()[0]) * 1024
    return out


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_method() -> str:
    """'rss-hwm-trim' where the RSS high-water mark can be reset, else 'torch-profiler'."""
    if os.path.exists("/proc/self/status") and _reset_hwm():
        return "rss-hwm-trim"
    return "torch-profiler"


def _cpu_peak_rss(fn: Callable[[], object]) -> int:
    release_free_memory()
    _reset_hwm()
    before = _status_bytes()["VmRSS"]
    fn()
    return max(0, _status_bytes()["VmHWM"] - before)


def _cpu_peak_profiler(fn: Callable[[], object]) -> int:
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        if e.device_type() == torch.autograd.DeviceType.CPU:
            cur += e.nbytes()
            peak = max(peak, cur)
    return peak


def peak_extra_bytes(fn: Callable[[], object], device: torch.device, method: Optional[str] = None) -> Tuple[int, str]:
    """(peak bytes allocated during ``fn()`` beyond those allocated before it, method name)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, "cuda-max-memory-allocated"
    method = method or cpu_method()
    if method == "rss-hwm-trim":
        return _cpu_peak_rss(fn), method
    return _cpu_peak_profiler(fn), method
