"""The process's peak resident memory, per pipeline stage.

Linux keeps the peak RSS (``VmHWM`` in ``/proc/self/status``) and lets a process reset it by
writing ``5`` to ``/proc/self/clear_refs``; each stage resets it before it runs and reads it
after, so ``report/run.json`` holds every stage's own peak. Elsewhere only the lifetime peak
(``ru_maxrss``) exists: it is reported as is, marked not resettable.

Work done in a child process counts too: the code that waits for the child passes the
child's own peak to ``note_child_peak`` (``child_peak`` reads it from ``/proc/PID/status`` or
the child reports it), and ``peak_rss`` returns the larger of the two.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")
_children = {"peak": 0}  # the largest child peak noted since the last reset


def release_memory() -> None:
    """Collect garbage and give freed heap pages back to the system (glibc ``malloc_trim``)."""
    import gc

    from lens_merge.weights.blocks import trim_heap

    gc.collect()
    trim_heap()


def reset_peak() -> bool:
    """Reset the peak RSS to the current RSS; False when the platform cannot."""
    _children["peak"] = 0
    try:
        _CLEAR.write_text("5")
        return True
    except OSError:
        return False


def note_child_peak(peak: int) -> None:
    """Record the peak RSS (bytes) of a child process this process ran and waited for."""
    _children["peak"] = max(_children["peak"], int(peak))


def own_peak_rss() -> int:
    """This process's own peak RSS in bytes since the last ``reset_peak`` (children apart)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB elsewhere


def peak_rss() -> int:
    """Peak resident set size in bytes since the last ``reset_peak`` (or process start): this
    process's own, or a child's noted with ``note_child_peak`` when that is larger."""
    return max(own_peak_rss(), _children["peak"])
