"""Which CPU a measurement was taken on: speed numbers mean little without it.

VNNI decides whether int8 is fast and whether u8 activations risk saturation (reduce_range);
the load average says whether the machine was busy while timing.
"""

from __future__ import annotations

import os
import platform


def _cpuinfo_fields():
    """(key, value) pairs of /proc/cpuinfo, stripped, in file order; none where it is absent."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, val = line.partition(":")
                yield key.strip(), val.strip()
    except OSError:
        return


def cpu_info() -> dict:
    """Model name, core count, load, and the instruction sets that matter for int8 (Linux
    /proc/cpuinfo; elsewhere whatever the platform reports)."""
    model, flags = platform.processor() or platform.machine(), set()
    for key, val in _cpuinfo_fields():
        if key == "model name" and model in ("", platform.processor(), platform.machine()):
            model = val
        elif key == "flags" and not flags:
            flags = set(val.split())
    try:
        load = round(os.getloadavg()[0], 2)
    except OSError:
        load = None
    return {
        "model": model,
        "cores": os.cpu_count(),
        "load_avg_1min": load,  # timings taken on a busy machine are not comparable
        "avx2": "avx2" in flags,
        "avx512": "avx512f" in flags,
        "vnni": bool({"avx512_vnni", "avx_vnni"} & flags),
    }


def physical_cores() -> int:
    """Physical cores this process may use: distinct (package, core) pairs of /proc/cpuinfo,
    capped by the CPU affinity mask; the logical CPU count where neither is known."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    pairs, package = set(), None
    for key, val in _cpuinfo_fields():
        if key == "physical id":
            package = val
        elif key == "core id":
            pairs.add((package, val))
    return max(1, min(len(pairs), logical) if pairs else logical)
