"""Which process owns a run: pid, its start time and host, and whether it is gone.

A run records its owner when it starts; readers of the store repair runs whose owner died
(killed, crashed, the machine rebooted). The process start time guards against a reused pid.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

# -- owning processes -------------------------------------------------------------------------
HOST = socket.gethostname()


def process_start_time(pid: int) -> int | None:
    """When a process started (clock ticks since boot, ``/proc/<pid>/stat`` field 22), or None
    when it does not exist, is a zombie, or there is no procfs.

    Together with the pid it names one process for good: a pid reused later by another
    process has another start time.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    if not fields or fields[0] in ("Z", "X"):
        return None
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def owner_fields() -> dict[str, Any]:
    """What identifies this process as a run's owner (recorded in status.json and claims)."""
    pid = os.getpid()
    return {"pid": pid, "pid_start": process_start_time(pid), "host": HOST}


def owner_gone(record: dict[str, Any]) -> bool:
    """Whether the process a status or claim names has ended (False when it cannot tell:
    no pid, or a pid of another host)."""
    pid = record.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    if record.get("host") not in (None, HOST):
        return False
    if not Path("/proc/self/stat").exists():  # no procfs: signal 0 tells existence only
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    start = process_start_time(pid)
    if start is None:
        return True
    recorded = record.get("pid_start")
    return recorded is not None and recorded != start
