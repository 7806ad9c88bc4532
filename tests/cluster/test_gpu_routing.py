"""On a cluster where one worker advertises a GPU (``dask worker --resources GPU=1``, as docs/cluster.md starts
one per GPU), the GPU stages' shards run on that worker only; the others' run anywhere."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import pytest
from conftest import run_cli, write_pipelines

from rcnn.data.synth import generate_dataset

pytest.importorskip("distributed")


def test_features_shards_go_only_to_the_worker_with_a_gpu(tmp_path, capsys):
    from distributed import Client, LocalCluster, get_task_stream

    generate_dataset(tmp_path / "voc", n_images=64, seed=4, size=96, progress=False)  # 3 + 2 parts of 16 images
    pfile = write_pipelines(tmp_path / "p.yaml", tmp_path / "voc")
    argv = ["--runs-dir", str(tmp_path / "runs"), "--pipelines-file", str(pfile), "--quiet"]
    code, _, err = run_cli(["run", "tiny", "--until", "finetune", *argv], capsys)
    assert code == 0, err

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:  # fmt: skip
        # A second worker as a user starts one on a GPU machine (the resource is only a label to the scheduler).
        gpu = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", cluster.scheduler_address,
             "--nthreads", "1", "--resources", "GPU=1", "--name", "gpu-worker", "--no-dashboard"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            client.wait_for_workers(2, timeout=60)
            workers = client.scheduler_info(n_workers=-1)["workers"]
            gpu_worker = next(a for a, w in workers.items() if w.get("resources", {}).get("GPU"))
            with get_task_stream(client) as stream:
                code, _, err = run_cli(["proposals", "tiny", "--force", "--cluster", cluster.scheduler_address, *argv], capsys)
                assert code == 0, err
                code, _, err = run_cli(["features", "tiny", "--cluster", cluster.scheduler_address, *argv], capsys)
                assert code == 0, err
            time.sleep(0.5)
        finally:
            gpu.terminate()
            gpu.wait(30)
    ran = {}
    for task in stream.data:
        stage = task["key"].split("-")[0]
        ran.setdefault(stage, []).append(task["worker"])
    assert len(ran["features"]) == 5 and set(ran["features"]) == {gpu_worker}
    # Proposals ask for no GPU: its shards spread over both workers.
    assert len(set(ran["proposals"])) == 2
