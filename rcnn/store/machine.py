"""The machine a unit was computed on, recorded in its manifest beside the library versions, and how busy it was
while the unit ran: timings from two runs compare methods only when they were taken on the same processor or card,
under a similar load."""

from __future__ import annotations

import math
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


# Linux's 1-minute load average is an exponential average of the run queue, updated every 5 s: over ``t`` seconds
# the value it had keeps the weight exp(-t / 60). Under half a minute it has hardly moved, and its 5 s steps
# and two decimals say little of what ran in between.
LOAD_TIME_CONSTANT_S = 60.0
LOAD_MIN_WALL_S = 30.0


def others_load(cpu_s: float | None, wall_s: float | None, start: float | None, end: float | None) -> float | None:
    """What else kept the machine busy during a unit, in cores: the run queue's mean over the unit, recovered from
    the 1-minute load average at its ``start`` and ``end`` (``end = start * d + mean * (1 - d)``, ``d`` the weight
    left to ``start``), less the cores the unit's own process kept busy (``cpu_s / wall_s``). None where a figure
    is missing or the unit took under :data:`LOAD_MIN_WALL_S`: a stage of a few seconds after a busy one read as
    another user's load, since the average still held the stage before."""
    if None in (cpu_s, wall_s, start, end) or wall_s < LOAD_MIN_WALL_S:
        return None
    kept = math.exp(-wall_s / LOAD_TIME_CONSTANT_S)
    mean = (end - start * kept) / (1 - kept)
    return max(0.0, mean - cpu_s / wall_s)


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
