"""Picking the compute device and measuring memory on it."""

from __future__ import annotations

import resource
import sys

import torch

from rgchat.errors import RGChatError

CHOICES = ("auto", "cpu", "cuda", "mps")


def resolve(name: str) -> torch.device:
    """'auto' picks CUDA, then MPS, then CPU; an explicit device must be present."""
    if name not in CHOICES:
        raise RGChatError(f"unknown device {name!r}; choose one of {', '.join(CHOICES)}")
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if cuda else "mps" if mps else "cpu"
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise RGChatError(f"device {name!r} is not available here")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _proc_status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (Linux), in bytes; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident memory of this process: since the last `reset_peak_rss()` where Linux allows it
    (VmHWM), else over its whole life (ru_maxrss, KiB on Linux, bytes on macOS)."""
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def rss_bytes() -> int:
    """Resident memory of this process now (Linux); the peak where the current value is not available."""
    now = _proc_status_bytes("VmRSS")
    return now if now is not None else peak_rss_bytes()


def reset_peak_rss() -> bool:
    """Start a new peak-RSS measurement (Linux: writing 5 to clear_refs); False where unsupported.

    Memory freed earlier is first handed back to the system (glibc's malloc_trim), so the new peak does
    not start from what the allocator merely kept."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def process_age_s() -> float | None:
    """Seconds since this process started (Linux), so start-up time includes imports; None elsewhere."""
    import os

    try:
        with open("/proc/self/stat") as f:
            started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
