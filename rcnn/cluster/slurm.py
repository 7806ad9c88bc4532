"""The pipeline's ``cluster`` section as dask-jobqueue's ``SLURMCluster`` settings, and the job script they give."""

from __future__ import annotations

from rcnn.config import ClusterConfig

from .environ import KEEP_GLIBC_MALLOC_ENV


def slurm_settings(section: ClusterConfig) -> dict:
    """Keyword arguments of ``dask_jobqueue.SLURMCluster``: one worker process per job, one thread per core;
    a job with GPUs asks for them (``--gres=gpu:N``) and its worker advertises them as the ``GPU`` resource,
    which the GPU stages' shards ask for."""
    settings = {
        "cores": section.cores,
        "processes": 1,
        "memory": section.memory,
        "walltime": section.walltime,
        "job_extra_directives": [],
        "worker_extra_args": [],
        "job_script_prologue": [f"export {KEEP_GLIBC_MALLOC_ENV}"],
    }
    if section.queue is not None:
        settings["queue"] = section.queue
    if section.gpus:
        settings["job_extra_directives"].append(f"--gres=gpu:{section.gpus}")
        settings["worker_extra_args"] += ["--resources", f"GPU={section.gpus}"]
    return settings


def job_script(section: ClusterConfig, scheduler: str = "tcp://SCHEDULER:8786") -> str:
    """The batch script each SLURM job runs (what ``SLURMCluster.job_script()`` prints), without a scheduler."""
    from dask_jobqueue.slurm import SLURMJob

    return SLURMJob(scheduler=scheduler, name="rcnn-worker", **slurm_settings(section)).job_script()
