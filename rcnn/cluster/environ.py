"""The environment of the worker processes a cluster runs our shards in."""

# distributed's nanny sets MALLOC_TRIM_THRESHOLD_=65536 in every worker it spawns. Setting it at all turns off
# glibc's dynamic mmap threshold (mallopt(3)), and OpenCV's selective search then runs 11-15 % slower: 0.90-0.93 s
# per voc07-mini image against 0.81 s unset, on a 2-core Xeon (0.92 s at 128 KiB, 0.94 s at 32 MiB). Our tasks
# write their results to disk and return little, so the memory trimming gives back is not worth that: the workers
# we start keep glibc's defaults.
#
# A LocalCluster's nannies run in the client's own process, and they put those variables (and one thread each for
# OpenMP, MKL and OpenBLAS) into the client's os.environ before spawning: torch imported afterwards in the client,
# where fine-tuning runs, would then use one thread. So the workers of `local:N` get their thread limits through
# the nanny's `env` instead, which is set inside the worker process only.
LOCAL_NANNY = {"distributed.nanny.pre-spawn-environ": {}}
LOCAL_WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
# For workers started by a SLURM job script (or by hand), which keep distributed's thread limits: dask reads
# this from the environment.
KEEP_GLIBC_MALLOC_ENV = "DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON=\"{'MALLOC_TRIM_THRESHOLD_': None}\""
