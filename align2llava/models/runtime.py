"""The process this code runs in: accelerate's process state and resource counters.
"""

from __future__ import annotations

import resource
import sys
from typing import Any


def process_state() -> Any:
    """accelerate's view of this process (main or not); on a machine without CUDA, several
    processes (torchrun, accelerate launch) form a CPU (gloo) group."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process, and CUDA's max allocated when on a GPU."""
    out = {"peak_rss_mb": peak_rss_mb()}
    try:
        import torch

        if torch.cuda.is_available():
            out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    except ImportError:  # pragma: no cover
        pass
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (ru_maxrss: KB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)
