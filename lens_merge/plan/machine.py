"""Memory sizes: parsing ``24GB``, printing bytes, and what this machine has.

Units as in ``eval.max_memory``: ``GB`` is 10^9 bytes, ``GiB`` 2^30 (a "24 GB" card has
24 GiB, so ``24GB`` leaves it 7 % of headroom); printed sizes are binary (GiB).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lens_merge.config import SIZE
from lens_merge.errors import ConfigError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_size(text: str | int, what: str = "memory") -> int:
    """Bytes of a size such as ``24GB``, ``24 GiB``, ``512M``, ``1.5T`` or a plain integer.

    Raises:
        ConfigError: naming ``what`` and the expected form.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise ConfigError(f"{what}: expected a positive size, got {text}")
        return text
    s = str(text).strip()
    m = re.match(SIZE, s)
    if not m:
        raise ConfigError(f"{what}: {text!r} is not a size; expected e.g. 24GB, 512MiB, 1.5TB")
    value, unit = float(re.match(r"[\d.]+", s).group()), s.lstrip("0123456789. ").lower()
    n = int(value * _UNITS[unit])
    if n <= 0:
        raise ConfigError(f"{what}: expected a positive size, got {text!r}")
    return n


def format_size(n: int | None) -> str:
    """``1.23 GiB``-style text of a byte count (``-`` for None)."""
    if n is None:
        return "-"
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def host_available() -> int | None:
    """RAM a new allocation can get now: ``MemAvailable`` of /proc/meminfo, psutil's
    ``available`` when installed, else free physical pages; None when nothing says."""
    meminfo = Path("/proc/meminfo")
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def device_available(device: str) -> int | None:
    """Free memory of a torch device: CPU and MPS (unified memory) -> host RAM; CUDA ->
    ``torch.cuda.mem_get_info`` (free bytes) when a GPU is there; None otherwise (give
    ``--memory``)."""
    kind = device.split(":")[0]
    if kind in ("cpu", "mps"):
        return host_available()
    if kind == "cuda":
        try:
            import torch

            if not torch.cuda.is_available():
                return None
            index = int(device.split(":")[1]) if ":" in device else 0
            return int(torch.cuda.mem_get_info(index)[0])
        except (ImportError, RuntimeError, ValueError, AssertionError):
            return None
    return None
