"""Starting or joining a Dask cluster for one command, and what the manifests record about it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from rcnn.config import ClusterConfig
from rcnn.errors import UserError

from .environ import LOCAL_NANNY, LOCAL_WORKER_ENV
from .spec import ClusterSpec

INSTALL = "pip install -e '.[dask]'"


def _require_dask() -> None:
    try:
        import dask_jobqueue  # noqa: F401
        import distributed  # noqa: F401
    except ImportError as e:
        raise UserError(f"--cluster needs Dask ({e.name} is not installed); install the extra: {INSTALL}") from None


@dataclass
class ClusterSession:
    """A connected ``distributed.Client`` and where it runs; the stages send their shards through it."""

    client: Any
    spec: ClusterSpec
    # Per unit just computed: where its work ran, for the manifest (see record()).
    runs: dict[str, dict] = field(default_factory=dict)

    @property
    def scheduler(self) -> str:
        return self.client.scheduler.address

    def workers(self) -> dict[str, dict]:
        try:  # recent versions list only the first few workers unless asked for all
            return self.client.scheduler_info(n_workers=-1)["workers"]
        except TypeError:
            return self.client.scheduler_info()["workers"]

    def worker_count(self) -> int:
        return max(1, len(self.workers()))

    def gpu_resources(self) -> dict[str, float] | None:
        """``{"GPU": 1}`` when some worker advertises a GPU (the GPU stages' shards then go to those), else None."""
        if any(w.get("resources", {}).get("GPU", 0) >= 1 for w in self.workers().values()):
            return {"GPU": 1}
        return None

    def note(self, label: str, shards: int, images: int) -> None:
        self.runs[label] = {
            "spec": str(self.spec),
            "scheduler": self.scheduler,
            "workers": len(self.workers()),
            "shards": shards,
            "images": images,
        }

    def record(self, label: str) -> dict:
        """Where ``label``'s work ran (the manifest's ``cluster``; never part of a fingerprint)."""
        return self.runs.pop(
            label, {"spec": str(self.spec), "scheduler": self.scheduler, "workers": len(self.workers()), "shards": 0}
        )


def _warm_up() -> None:
    # Imported once per worker at start, so the first shard's time is the stage's own.
    import rcnn.stages  # noqa: F401


@contextlib.contextmanager
def open_session(spec: ClusterSpec, section: ClusterConfig, log: Callable[[str], None]) -> Iterator[ClusterSession]:
    """Start (``local``, ``slurm``) or join (``tcp``) the cluster; closed, with what it started, on the way out."""
    _require_dask()
    from distributed import Client, LocalCluster

    # Worker logs (and the scheduler's chatter) stay off the terminal; a shard's failure reaches us as its exception.
    for name in ("distributed", "dask_jobqueue"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.ExitStack() as stack:
        if spec.kind == "local":
            import dask

            stack.enter_context(dask.config.set(LOCAL_NANNY))
            cluster = stack.enter_context(
                LocalCluster(
                    n_workers=spec.workers,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=None,
                    silence_logs=logging.ERROR,
                    env=LOCAL_WORKER_ENV,
                )
            )
            client = stack.enter_context(Client(cluster))
        elif spec.kind == "tcp":
            try:
                client = stack.enter_context(Client(spec.address, timeout=f"{section.connect_timeout}s"))
            except OSError:
                raise UserError(
                    f"cluster {spec.address}: no scheduler answered within {section.connect_timeout:g} s "
                    "(cluster.connect_timeout); is `dask scheduler` running there, and the port open?"
                ) from None
        else:
            from dask_jobqueue import SLURMCluster

            from .slurm import slurm_settings

            cluster = stack.enter_context(SLURMCluster(**slurm_settings(section)))
            cluster.scale(jobs=section.jobs)
            client = stack.enter_context(Client(cluster))
        if spec.kind == "local":
            client.wait_for_workers(spec.workers)
        client.run(_warm_up)
        session = ClusterSession(client, spec)
        log(f"cluster {spec}: scheduler {session.scheduler}, {len(session.workers())} worker(s)")
        yield session
