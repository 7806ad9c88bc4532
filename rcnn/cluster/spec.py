"""Where the work runs: ``--cluster`` / ``$RCNN_CLUSTER`` / ``cluster.address``, parsed and checked."""

from __future__ import annotations

import re
from dataclasses import dataclass

from rcnn.errors import ConfigError

FORMS = "local:N, tcp://HOST:PORT or slurm"


@dataclass(frozen=True)
class ClusterSpec:
    """``kind`` is "local" (``workers`` processes on this machine), "tcp" (a running scheduler) or "slurm"."""

    kind: str
    workers: int | None = None
    address: str | None = None

    def __str__(self) -> str:
        return {"local": f"local:{self.workers}", "tcp": str(self.address), "slurm": "slurm"}[self.kind]


def parse_cluster(text: str) -> ClusterSpec:
    """``local:2`` -> 2 local worker processes; ``tcp://host:8786`` -> that scheduler; ``slurm`` -> dask-jobqueue."""
    value = text.strip()
    m = re.fullmatch(r"local:(\d+)", value)
    if m:
        n = int(m.group(1))
        if n < 1:
            raise ConfigError(f"cluster '{text}': local needs at least 1 worker, e.g. local:2")
        return ClusterSpec("local", workers=n)
    if re.fullmatch(r"tcp://[^\s/:]+:\d+", value):
        return ClusterSpec("tcp", address=value)
    if value == "slurm":
        return ClusterSpec("slurm")
    raise ConfigError(f"cluster '{text}': expected {FORMS}")


def resolve(option: str | None, configured: str | None) -> ClusterSpec | None:
    """The command line's (or ``$RCNN_CLUSTER``'s) choice, else the pipeline's ``cluster.address``; None: no cluster."""
    text = option if option not in (None, "") else configured
    return None if text in (None, "") else parse_cluster(text)
