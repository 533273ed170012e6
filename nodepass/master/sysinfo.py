"""The host's figures for NodePass's ``/info``, read through psutil (not /proc by hand).

psutil reads the kernel's counters (on Linux, /proc) quickly and without blocking;
what a platform does not offer (disk counters in some containers) reads as 0, and an
unknown CPU load as -1, as NodePass reports them.
"""

from __future__ import annotations

import platform
import socket
from typing import Any

import psutil

# platform.machine() -> Go's GOARCH, the names NodePass panels know
_GOARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
           "i386": "386", "i686": "386", "armv7l": "arm", "armv6l": "arm",
           "riscv64": "riscv64", "ppc64le": "ppc64le", "s390x": "s390x",
           "mips64": "mips64", "loongarch64": "loong64"}


def prime() -> None:
    """psutil's CPU load is measured between calls: start the first interval now."""
    psutil.cpu_percent(interval=None)


def figures(now: float) -> dict[str, Any]:
    """``os``, ``arch``, ``cpu`` (percent, -1 unknown), memory, swap, network and disk
    counters (bytes), ``sysup`` (seconds since boot at ``now``), ``name``."""
    memory, swap = psutil.virtual_memory(), psutil.swap_memory()
    net, disk = psutil.net_io_counters(), _disk()
    try:
        cpu = round(psutil.cpu_percent(interval=None))
    except (OSError, RuntimeError):
        cpu = -1
    machine = platform.machine().lower()
    return {
        "os": platform.system().lower(),
        "arch": _GOARCH.get(machine, machine),
        "cpu": cpu,
        "mem_total": memory.total,
        "mem_used": memory.used,
        "swap_total": swap.total,
        "swap_used": swap.used,
        "netrx": net.bytes_recv if net is not None else 0,
        "nettx": net.bytes_sent if net is not None else 0,
        "diskr": disk.read_bytes if disk is not None else 0,
        "diskw": disk.write_bytes if disk is not None else 0,
        "sysup": max(0, int(now - psutil.boot_time())),
        "name": socket.gethostname(),
    }


def _disk() -> Any:
    try:
        return psutil.disk_io_counters()
    except (OSError, RuntimeError):
        return None
