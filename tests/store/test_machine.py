"""The machine a unit was computed on, and how busy it was, in its manifest: what a report needs to say where
timings come from."""

from __future__ import annotations

import json
import os
import time

from conftest import run_cli

from rcnn.store.machine import Stopwatch, cpu_model, load_average, machine_record, machine_text


def test_the_record_names_the_processor_and_a_card_only_for_a_gpu_stage():
    record = machine_record("cpu")
    assert record == {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": None} and record["cpu"]
    assert machine_text(record) == f"{record['cpu']}, {os.cpu_count()} cores"
    assert machine_text({"cpu": "Xeon", "cores": 16, "gpu": "NVIDIA H200"}) == "NVIDIA H200 (Xeon, 16 cores)"
    assert machine_text({}) == "n/a" and machine_text(None) == "n/a"


def test_a_gpu_stages_device_label_gives_the_cards_name_without_asking_torch(monkeypatch):
    # A GPU stage's metrics hold a label, "cuda:0 (NVIDIA H100 80GB HBM3)", which torch.device refused: every GPU
    # stage would have crashed writing its manifest, after its work.
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "asked")
    assert machine_record("cuda:0 (NVIDIA H100 80GB HBM3)")["gpu"] == "NVIDIA H100 80GB HBM3"
    assert machine_record("cuda:0")["gpu"] == "asked" and machine_record("cuda")["gpu"] == "asked"

    def no_card(device=None):
        raise RuntimeError("Found no NVIDIA driver on your system")

    monkeypatch.setattr(torch.cuda, "get_device_name", no_card)
    assert machine_record("cuda:1")["gpu"] == "unknown GPU"


def test_every_manifest_records_its_machine(pipelines_file, tmp_path, capsys):
    runs = tmp_path / "runs"
    argv = ["proposals", "tiny", "--pipelines-file", str(pipelines_file), "--runs-dir", str(runs), "--quiet"]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    for split in ("trainval", "test"):
        manifest = json.loads((runs / "tiny" / "proposals" / split / "manifest.json").read_text())
        assert manifest["machine"] == machine_record(None)
        # Beside the wall time, what it cost the processor and how busy the machine was (a second user's load
        # made one run's features 11x slower, and the report said so as a difference of the methods).
        timings = manifest["timings"]
        assert timings["cpu_s"] > 0 and timings["children_cpu_s"] >= 0 and timings["wall_s"] > 0
        assert timings["load_1m_start"] >= 0 and timings["load_1m_end"] >= 0


def test_the_stopwatch_times_the_processor_and_the_load_where_the_system_has_one(monkeypatch):
    clock = Stopwatch()
    end = clock.started + 0.2
    while time.time() < end:  # busy: processor time grows with the wall time
        pass
    timings = clock.timings()
    # Only bounds that hold whatever else this process's threads or an exiting worker of an earlier test do meanwhile.
    assert timings["cpu_s"] >= 0.1 and timings["wall_s"] >= 0.2 and timings["children_cpu_s"] >= 0
    if hasattr(os, "getloadavg"):
        assert timings["load_1m_start"] >= 0 and timings["load_1m_end"] >= 0
    assert set(clock.timings(machine=False)) == {"started", "wall_s"}  # on a cluster: the client's would mislead

    def no_load():
        raise OSError("load average unobtainable")

    monkeypatch.setattr(os, "getloadavg", no_load)
    assert load_average() is None and Stopwatch().timings()["load_1m_end"] is None
    monkeypatch.delattr(os, "getloadavg")  # Windows has none
    assert load_average() is None
