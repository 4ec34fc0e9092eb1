"""The peak resident memory of one stretch of work: this process's, and that of the child processes it waited
for during it (a training step's workers).

On Linux the process's peak (VmHWM) is reset when the stretch begins (`/proc/self/clear_refs`), so each step gets
its own; where that cannot be done, the figure is the process's peak so far and says so (`scope: process`). A
child's peak is the largest of the children waited for (getrusage's RUSAGE_CHILDREN): it counts when it rose
during the stretch."""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

_STATUS, _CLEAR = Path("/proc/self/status"), Path("/proc/self/clear_refs")


class PeakRss:
    """`with PeakRss() as peak: ...`, then `peak.figure()`: {"peak_rss_bytes", "scope"}."""

    def __enter__(self) -> PeakRss:
        try:
            _CLEAR.write_text("5")  # resets VmHWM to the current RSS
            self.scope = "step"
        except OSError:
            self.scope = "process"
        self.children = _children()
        return self

    def __exit__(self, *exc: Any) -> None:
        own = _hwm()
        children = _children()
        self.bytes = max(own, children if children > self.children else 0)

    def figure(self) -> dict[str, Any]:
        return {"peak_rss_bytes": self.bytes, "scope": self.scope}


def _hwm() -> int:
    """This process's peak resident memory, in bytes."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _children() -> int:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
