"""The environment of the worker processes a cluster runs our shards in."""

# distributed's nanny sets MALLOC_TRIM_THRESHOLD_=65536 in every worker it spawns. Setting it at all turns off
# glibc's dynamic mmap threshold (mallopt(3)), and OpenCV's selective search then runs 11-15 % slower: 0.90-0.93 s
# per voc07-mini image against 0.81 s unset, on a 2-core Xeon (0.92 s at 128 KiB, 0.94 s at 32 MiB). Our tasks
# write their results to disk and return little, so the memory trimming gives back is not worth that: the workers
# we start keep glibc's defaults.
KEEP_GLIBC_MALLOC = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
# The same for workers started by a SLURM job script (or by hand): dask reads it from the environment.
KEEP_GLIBC_MALLOC_ENV = "DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON=\"{'MALLOC_TRIM_THRESHOLD_': None}\""
