"""The process's peak resident memory, per pipeline stage.

Linux keeps the peak RSS (``VmHWM`` in ``/proc/self/status``) and lets a process reset it by
writing ``5`` to ``/proc/self/clear_refs``; each stage resets it before it runs and reads it
after, so ``report/run.json`` holds every stage's own peak. Elsewhere only the lifetime peak
(``ru_maxrss``) exists: it is reported as is, marked not resettable.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")


def release_memory() -> None:
    """Collect garbage and give freed heap pages back to the system (glibc ``malloc_trim``)."""
    import gc

    from lens_merge.weights.blocks import trim_heap

    gc.collect()
    trim_heap()


def reset_peak() -> bool:
    """Reset the peak RSS to the current RSS; False when the platform cannot."""
    try:
        _CLEAR.write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident set size in bytes since the last ``reset_peak`` (or process start)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB elsewhere
