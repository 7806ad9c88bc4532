"""The machine a unit was computed on, recorded in its manifest beside the library versions: timings from two
runs compare methods only when they were taken on the same processor or card."""

from __future__ import annotations

import os
import platform
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
