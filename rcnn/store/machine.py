"""The machine a unit was computed on, recorded in its manifest beside the library versions, and how busy it was
while the unit ran: timings from two runs compare methods only when they were taken on the same processor or card,
under a similar load."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path


def cpu_model() -> str:
    """The processor's name from /proc/cpuinfo (``platform.processor()`` is empty on most Linux systems)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_record(device: object = None) -> dict:
    """The processor, its core count and, when ``device`` names a CUDA device (a stage's device label, such as
    ``"cuda:0 (NVIDIA H100 80GB HBM3)"``, or ``"cuda:0"``), the card's name. Never raises: a manifest is written
    after the stage's work, which must not be lost to this record."""
    gpu = None
    if isinstance(device, str) and device.startswith("cuda"):
        named = device.partition(" (")[2].rstrip(")")
        try:
            import torch  # only a stage that ran on a GPU gets here, with torch loaded already

            gpu = named or torch.cuda.get_device_name(torch.device(device.split()[0]))
        except Exception:  # noqa: BLE001 -- no card to ask: the label's own name, or unknown
            gpu = named or "unknown GPU"
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": gpu}


def machine_text(record: dict | None) -> str:
    """``"NVIDIA H100 80GB HBM3 (Intel Xeon …, 16 cores)"``, or ``"n/a"`` for a manifest without the record."""
    if not isinstance(record, dict) or not record.get("cpu"):
        return "n/a"
    host = f"{record['cpu']}, {record.get('cores')} cores"
    return f"{record['gpu']} ({host})" if record.get("gpu") else host


def load_average() -> float | None:
    """The 1-minute load average (processes running or waiting for a core, averaged over the last minute), or
    None where the system keeps none (Windows)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def cpu_seconds() -> tuple[float, float]:
    """Processor seconds (user + system) of this process, all its threads, and of its child processes that
    have ended and been waited for (a stage's worker pool, once closed)."""
    t = os.times()
    return t.user + t.system, t.children_user + t.children_system


class Stopwatch:
    """Wall time, processor time and the load average over one unit's work, for its manifest's ``timings``.

    The load average at the start shows what else kept the machine busy before the work began; at the end it
    includes the unit's own processes. A stage that waits for a busy processor takes longer in wall time,
    not in processor time.
    """

    def __init__(self) -> None:
        self.started = time.time()
        self.load_start = load_average()
        self.cpu_start = cpu_seconds()

    def timings(self, machine: bool = True) -> dict:
        """``started``, ``wall_s`` and, with ``machine`` (the work ran in this process and its workers, not on
        a cluster's), ``cpu_s``, ``children_cpu_s``, ``load_1m_start`` and ``load_1m_end``."""
        out: dict = {"started": self.started, "wall_s": time.time() - self.started}
        if machine:
            own, children = cpu_seconds()
            out["cpu_s"] = round(own - self.cpu_start[0], 3)
            out["children_cpu_s"] = round(children - self.cpu_start[1], 3)
            out["load_1m_start"], out["load_1m_end"] = self.load_start, load_average()
        return out
