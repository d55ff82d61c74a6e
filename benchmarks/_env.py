"""What every benchmark records beside its figures: device, dtype, threads, versions."""

from __future__ import annotations

import os
import platform
import resource


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def rss_mb() -> float:
    """Resident memory of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def environment(device: str, dtype: str) -> dict:
    import torch

    name = torch.cuda.get_device_name() if device.startswith("cuda") else cpu_name()
    return {"device": f"{device} ({name})", "dtype": dtype, "threads": torch.get_num_threads(),
            "torch": torch.__version__}
