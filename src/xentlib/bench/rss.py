"""Resident set size of this process: now, the peak (the kernel's high-water mark VmHWM), and resetting that
peak to the current size. Linux reads /proc/self; elsewhere both readings fall back to getrusage's peak."""

from __future__ import annotations

import resource


def _status_kib(field: str) -> int | None:
    """A `field: N kB` line of /proc/self/status, None where there is no such file or line."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _bytes_or_peak(kib: int | None) -> int:
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def current_rss() -> int:
    """Bytes resident now (VmRSS)."""
    return _bytes_or_peak(_status_kib("VmRSS"))


def peak_rss() -> int:
    """Most bytes resident since the process started or since the last `reset_peak_rss` (VmHWM)."""
    return _bytes_or_peak(_status_kib("VmHWM"))


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False
