"""Running the per-image and per-class work of stages on a Dask cluster (``dask.distributed``).

``spec`` parses where to run (``local:N``, ``tcp://HOST:PORT``, ``slurm``), ``session`` starts or joins the
cluster, ``shards`` plans a stage's images into shards and runs them with one progress bar, ``tasks`` is
what a worker runs, ``slurm`` turns the pipeline's ``cluster`` section into dask-jobqueue's settings.
Nothing here imports dask at module level: the base install works without it.
"""
