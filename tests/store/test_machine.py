"""The machine a unit was computed on, in its manifest: what a report needs to say where timings come from."""

from __future__ import annotations

import json
import os

from conftest import run_cli

from rcnn.store.machine import cpu_model, machine_record, machine_text


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
