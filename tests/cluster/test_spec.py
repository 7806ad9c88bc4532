"""The cluster's pure parts: parsing where to run, planning shards, the SLURM job script; no Dask in the base commands."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from rcnn.cluster.shards import pending_groups, plan_shards
from rcnn.cluster.spec import ClusterSpec, parse_cluster, resolve
from rcnn.config import ClusterConfig, PipelineFile, default_pipelines_file, fingerprint_params
from rcnn.errors import ConfigError


@pytest.mark.parametrize(
    "text, spec",
    [
        ("local:2", ClusterSpec("local", workers=2)),
        (" local:16 ", ClusterSpec("local", workers=16)),
        ("tcp://10.0.0.5:8786", ClusterSpec("tcp", address="tcp://10.0.0.5:8786")),
        ("slurm", ClusterSpec("slurm")),
    ],
)
def test_cluster_specs_parse(text, spec):
    assert parse_cluster(text) == spec
    assert parse_cluster(str(spec)) == spec


@pytest.mark.parametrize("text", ["local:0", "local", "local:two", "tcp://host", "http://host:8786", "pbs", ""])
def test_bad_cluster_specs_are_config_errors(text):
    with pytest.raises(ConfigError, match="expected local:N|at least 1 worker"):
        parse_cluster(text)


def test_the_command_line_wins_over_the_pipeline_and_nothing_means_no_cluster():
    assert resolve("local:2", "slurm") == ClusterSpec("local", workers=2)
    assert resolve(None, "slurm") == ClusterSpec("slurm")
    assert resolve("", None) is None and resolve(None, None) is None


def test_pending_groups_are_the_parts_with_a_missing_image():
    ids = [f"i{k}" for k in range(7)]
    # parts of 3: [i0 i1 i2] [i3 i4 i5] [i6]; the first is done, the second only half.
    assert pending_groups(ids, {"i0", "i1", "i2", "i3"}, 3) == [(1, ["i3", "i4", "i5"]), (2, ["i6"])]
    assert pending_groups(ids, set(ids), 3) == []


def test_shards_hold_whole_consecutive_parts():
    groups = [(g, [f"{g}-{k}" for k in range(4)]) for g in range(5)]  # 5 parts of 4 images
    # 10 images per shard round up to 3 whole parts: parts 0-2, then 3-4.
    assert [[g for g, _ in s] for s in plan_shards(groups, workers=2, shard_images=10)] == [[0, 1, 2], [3, 4]]
    # By default about 8 shards per worker: 20 images on 2 workers -> 2 images -> one part each.
    assert [[g for g, _ in s] for s in plan_shards(groups, workers=2)] == [[0], [1], [2], [3], [4]]
    assert plan_shards([], workers=4) == []


def test_the_cluster_section_is_in_no_fingerprint():
    cfg = PipelineFile(default_pipelines_file()).load("demo", ["cluster.address=local:2", "cluster.jobs=9"])
    assert cfg.cluster.address == "local:2"
    assert "cluster" not in fingerprint_params(cfg)


def test_slurm_job_script_carries_the_sections_settings():
    pytest.importorskip("dask_jobqueue")
    from rcnn.cluster.slurm import job_script

    section = ClusterConfig(address="slurm", queue="gpu", cores=8, memory="32GB", gpus=2, walltime="04:30:00", jobs=3)
    script = job_script(section, scheduler="tcp://10.0.0.1:8786")
    lines = script.splitlines()
    assert "#SBATCH -p gpu" in lines
    assert "#SBATCH --cpus-per-task=8" in lines
    assert "#SBATCH -t 04:30:00" in lines
    assert "#SBATCH --gres=gpu:2" in lines
    assert any(line.startswith("#SBATCH --mem=") for line in lines)  # dask-jobqueue writes 32GB as 30G
    worker = lines[-1]
    assert "tcp://10.0.0.1:8786" in worker and "--nthreads 8" in worker and "--resources GPU=2" in worker

    cpu_only = job_script(ClusterConfig(address="slurm", cores=2))
    assert "--gres" not in cpu_only and "--resources" not in cpu_only and "#SBATCH -p" not in cpu_only


def test_the_base_commands_do_not_import_dask():
    code = "import sys; from rcnn.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\n"
    code += "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed', 'dask_jobqueue')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_without_dask_installed_cluster_is_one_line_naming_the_extra(pipelines_file, tmp_path, monkeypatch, capsys):
    from conftest import run_cli

    monkeypatch.setitem(sys.modules, "distributed", None)  # as if not installed: its import raises ImportError
    argv = ["proposals", "tiny", "--runs-dir", str(tmp_path / "runs"), "--pipelines-file", str(pipelines_file)]
    code, _, err = run_cli([*argv, "--cluster", "local:1"], capsys)
    assert code == 1
    assert (
        err.strip()
        == "rcnn: error: --cluster needs Dask (distributed is not installed); install the extra: pip install -e '.[dask]'"
    )
    code, _, err = run_cli([*argv, "--cluster", "local:x"], capsys)
    assert code == 2 and "expected local:N, tcp://HOST:PORT or slurm" in err


class _FakeClient:
    """What ClusterSession asks a client: the workers the scheduler knows and their resources."""

    def __init__(self, resources: list[dict]):
        self.workers = {f"tcp://w{k}:1": {"resources": r} for k, r in enumerate(resources)}

    def scheduler_info(self, n_workers: int = 5) -> dict:
        return {"workers": dict(list(self.workers.items())[: None if n_workers == -1 else n_workers])}


def test_gpu_stages_ask_for_a_gpu_only_where_a_worker_has_one():
    from rcnn.cluster.session import ClusterSession

    spec = ClusterSpec("tcp", address="tcp://s:8786")
    assert ClusterSession(_FakeClient([{}, {}]), spec).gpu_resources() is None
    assert ClusterSession(_FakeClient([{}, {"GPU": 1}]), spec).gpu_resources() == {"GPU": 1}
    # Every worker is counted, not the first five a scheduler lists by default.
    assert ClusterSession(_FakeClient([{}] * 12), spec).worker_count() == 12


def _worker_environment():
    import torch

    return torch.get_num_threads(), {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")}


def test_local_workers_keep_glibcs_malloc_one_thread_each_and_the_clients_environment_as_it_was():
    # distributed sets MALLOC_TRIM_THRESHOLD_ in its workers, which slows selective search by 11-15 %, and a
    # LocalCluster's nannies (in this process) would set it and the thread limits in the client's environment.
    pytest.importorskip("distributed")
    from rcnn.cluster.session import open_session

    keys = ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    before = {k: os.environ.get(k) for k in keys}
    with open_session(parse_cluster("local:1"), ClusterConfig(), lambda _: None) as session:
        seen = list(session.client.run(_worker_environment).values())
        during = {k: os.environ.get(k) for k in keys}
    assert seen == [(1, {"MALLOC_TRIM_THRESHOLD_": before["MALLOC_TRIM_THRESHOLD_"], "OMP_NUM_THREADS": "1"})]
    assert during == before  # torch imported now by the client (fine-tuning) keeps its threads
    assert {k: os.environ.get(k) for k in keys} == before


def test_slurm_workers_keep_glibcs_malloc_defaults():
    pytest.importorskip("dask_jobqueue")
    from rcnn.cluster.slurm import job_script

    script = job_script(ClusterConfig(address="slurm", cores=2))
    # The job's environment as the script sets it, and what the worker's nanny then puts in its worker's.
    exports = [line for line in script.splitlines() if line.startswith("export ")]
    probe = "from distributed.nanny import _get_env_variables as g; print(sorted(g('distributed.nanny.pre-spawn-environ')))"
    shell = "\n".join([*exports, f'{sys.executable} -c "{probe}"'])
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    out = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, check=True, env=env).stdout
    assert "OMP_NUM_THREADS" in out and "MALLOC_TRIM_THRESHOLD_" not in out


def test_an_unreachable_scheduler_is_one_line_after_the_configured_timeout(pipelines_file, tmp_path, capsys):
    pytest.importorskip("distributed")
    import socket
    import time

    from conftest import run_cli

    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        argv = ["proposals", "tiny", "--runs-dir", str(tmp_path / "runs"), "--pipelines-file", str(pipelines_file)]
        start = time.monotonic()
        code, _, err = run_cli([*argv, "--cluster", f"tcp://127.0.0.1:{port}", "--set", "cluster.connect_timeout=1"], capsys)
        took = time.monotonic() - start
    assert code == 1
    assert err.strip() == (
        f"rcnn: error: cluster tcp://127.0.0.1:{port}: no scheduler answered within 1 s (cluster.connect_timeout); "
        "is `dask scheduler` running there, and the port open?"
    )
    assert took < 15  # the setting, not the 20 s default, bounded the wait
    assert not (tmp_path / "runs" / "tiny" / "proposals").exists()  # nothing was started
