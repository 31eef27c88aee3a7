"""Shared bits of the benchmarks: machine description, JSON + table output."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
from typing import Any


def machine() -> dict[str, Any]:
    """What the numbers were measured on (printed beside every figure)."""
    import torch

    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu_count": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": os.getloadavg(),
    }


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(result: dict[str, Any], table: str | None = None) -> None:
    """Human table on stderr, JSON on stdout (so `> result.json` keeps only the JSON)."""
    if table:
        print(table, file=sys.stderr)
    print(json.dumps(result, indent=2, default=str))
