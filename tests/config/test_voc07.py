"""The papers' pipelines on the official VOC2007 layout: their settings, the devkit folder, and a short run
of each with the heavy settings turned down (tiny backbone, few boxes and iterations), on synthetic images
placed where the devkit puts VOC2007's."""

from __future__ import annotations

import dataclasses
import json
import shutil
import urllib.error
from pathlib import Path

import pytest
from conftest import TEST_DEVICE, run_cli

from rcnn.config import PipelineFile
from rcnn.data.datasets import VOCDataset
from rcnn.errors import UserError

REPO = Path(__file__).resolve().parents[2]
PIPELINES = REPO / "pipelines.yaml"
VOC_CLASSES = [
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]

# What a CPU test can afford: the pipelines' structure, not their size. The data's own five classes replace
# VOC's twenty (every configured class needs training objects).
SMALL = [
    "data.classes=null",
    "proposals.mode=single",
    "proposals.min_size=4",
    "proposals.max_proposals=50",
    "proposals.n_jobs=1",
    "model.backbone=tiny",
    "model.weights=scratch",
    "model.input_size=32",
    f"model.device={TEST_DEVICE}",
    "finetune.context_pad=3",
    "finetune.optimizer=adam",
    "finetune.batch_size=32",
    "finetune.max_iter=8",
    "finetune.step_size=8",
    "finetune.eval_every=8",
    "features.batch_size=64",
    "svm.n_jobs=1",
]


@pytest.fixture
def devkit(tiny_voc, tmp_path) -> Path:
    """The tiny synthetic dataset as VOCdevkit/VOC2007, with the release's other files beside the splits."""
    voc = tmp_path / "VOCdevkit" / "VOC2007"
    shutil.copytree(tiny_voc, voc)
    main = voc / "ImageSets" / "Main"
    trainval = main.joinpath("trainval.txt").read_text().split()
    for cls in ("circle", "square"):  # the per-class lists: "<id> 1|-1", one file per class and split
        main.joinpath(f"{cls}_trainval.txt").write_text("".join(f"{i} {1 if k % 2 else -1}\n" for k, i in enumerate(trainval)))
    for folder in ("ImageSets/Layout", "ImageSets/Segmentation", "SegmentationClass", "SegmentationObject"):
        (voc / folder).mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "trainval.txt").write_text(trainval[0] + "\n")
    (tmp_path / "VOCdevkit" / "VOCcode").mkdir()
    return voc


def _flat(cfg) -> dict:
    out = {}

    def walk(d, prefix=""):
        for k, v in d.items():
            walk(v, f"{prefix}{k}.") if isinstance(v, dict) else out.__setitem__(f"{prefix}{k}", v)

    walk(dataclasses.asdict(cfg))
    return out


def test_the_papers_settings():
    pf = PipelineFile(PIPELINES)
    voc07, spp, spp5 = pf.load("voc07"), pf.load("voc07-spp"), pf.load("voc07-spp5")
    # R-CNN: selective search's fast mode, every box of at least 20 px, the image at full size.
    assert (voc07.proposals.mode, voc07.proposals.max_proposals, voc07.proposals.min_size) == ("fast", None, 20)
    assert voc07.proposals.resize_width is None
    assert (voc07.model.backbone, voc07.model.weights, voc07.model.input_size) == ("alexnet", "imagenet", None)
    assert list(voc07.data.classes) == VOC_CLASSES and (voc07.data.trainval, voc07.data.test) == ("trainval", "test")
    ft = voc07.finetune
    assert (ft.context_pad, ft.fg_threshold, ft.bg_low, ft.batch_size, ft.fg_fraction, ft.mirror) == (16, 0.5, 0, 128, 0.25, True)
    assert (ft.optimizer, ft.lr, ft.momentum, ft.weight_decay, ft.gamma) == ("sgd", 0.001, 0.9, 0.0005, 0.1)
    assert (ft.max_iter, ft.step_size, ft.val_fraction) == (70000, 20000, 0)
    svm, bbox = voc07.svm, voc07.bbox
    assert (svm.C, svm.pos_loss_weight, svm.bias_mult, svm.neg_overlap, svm.neg_max_mutual_overlap) == (0.001, 2, 10, 0.3, None)
    assert (bbox.ridge_lambda, bbox.min_overlap, voc07.evaluate.nms_threshold, voc07.evaluate.metric) == (1000, 0.6, 0.3, "voc07")
    # SPP-net: the same proposals and data, a fixed ImageNet trunk, 688 px or five scales, fc fine-tuning.
    assert spp.method == "spp" and spp.proposals == voc07.proposals and spp.data == voc07.data
    assert (spp.model.backbone, spp.model.weights) == ("alexnet", "imagenet")
    assert (spp.spp.scales, spp.spp.levels, spp.spp.target_size, spp.spp.max_side) == ((688,), (6, 3, 2, 1), 224, None)
    assert spp5.spp.scales == (480, 576, 688, 864, 1200)
    assert {k for k, v in _flat(spp5).items() if _flat(spp)[k] != v} == {"name", "description", "spp.scales"}
    ft = spp.finetune
    assert (ft.bg_low, ft.fg_threshold, ft.batch_size, ft.fg_fraction, ft.mirror) == (0.1, 0.5, 128, 0.25, True)
    assert (ft.lr, ft.gamma, ft.step_size, ft.max_iter) == (0.0001, 0.1, 250000, 300000)  # 250k at 1e-4, 50k at 1e-5
    assert (spp.svm.neg_max_mutual_overlap, spp.bbox.min_overlap, spp.bbox.ridge_lambda) == (0.7, 0.5, 1000)
    for name, parent in (("voc07-vgg16", voc07), ("voc07-spp-vgg16", spp)):
        vgg = pf.load(name)
        assert vgg.model.backbone == "vgg16" and vgg.model.weights == "imagenet" and vgg.proposals == parent.proposals
    # R-CNN's VGG16 solver: 24-region batches (6 foreground), otherwise AlexNet's schedule.
    vgg = pf.load("voc07-vgg16").finetune
    assert (vgg.batch_size, vgg.fg_fraction, vgg.lr, vgg.step_size, vgg.max_iter, vgg.context_pad) == (
        24,
        0.25,
        0.001,
        20000,
        70000,
        16,
    )
    for name in ("voc07", "voc07-vgg16", "voc07-spp", "voc07-spp5", "voc07-spp-vgg16"):
        assert pf.load(name).hardware == "gpu"


@pytest.mark.parametrize(
    "mini, full", [("voc07-mini", "voc07"), ("voc07-mini-spp", "voc07-spp"), ("voc07-mini-spp5", "voc07-spp5")]
)
def test_the_mini_pipelines_differ_from_the_full_ones_only_where_they_say(mini, full):
    pf = PipelineFile(PIPELINES)
    small, large = _flat(pf.load(mini)), _flat(pf.load(full))
    differ = {k for k in small if small[k] != large[k]}
    scaled = {"finetune.max_iter", "finetune.step_size"}
    # The papers' per-layer rates are for AlexNet's pretrained fc6/fc7; SqueezeNet's are new: one rate for all.
    rates = {"finetune.bias_lr_mult", "finetune.bias_decay"} | (
        {"finetune.classifier_lr_mult"} if mini == "voc07-mini" else set()
    )
    # SPP-net's fc layers start at the released solver's 1e-3 (the paper's 1e-4 left SqueezeNet's new ones idle).
    rates |= set() if mini == "voc07-mini" else {"finetune.lr"}
    assert differ == {"name", "description", "data.root", "model.backbone", "model.weights"} | scaled | rates
    assert all(small[k] in (1, True) for k in rates - {"finetune.lr"})
    # The schedule keeps the passes over each image: scaled from VOC2007's 5011 trainval images to 775, from the
    # paper's (R-CNN) or the released solver's (SPP-net: 30000 steps per rate, three rates).
    source = {"finetune.max_iter": large["finetune.max_iter"], "finetune.step_size": large["finetune.step_size"]}
    if mini != "voc07-mini":
        source = {"finetune.max_iter": 90000, "finetune.step_size": 30000}
        assert small["finetune.lr"] == 0.001 and small["finetune.gamma"] == 0.1
    for key in scaled:
        assert small[key] == pytest.approx(source[key] * 775 / 5011, rel=0.01)
    assert small["model.backbone"] == "squeezenet1_0" and small["model.weights"].endswith("squeezenet1_0-imagenet.pth")


@pytest.mark.parametrize(
    "bccd, voc, scaled",
    [
        ("bccd", "voc07-mini", True),
        ("bccd-spp", "voc07-mini-spp", True),
        ("bccd-cpu", "voc07-mini-cpu", False),
        ("bccd-spp-cpu", "voc07-mini-spp-cpu", False),
        ("bccd-fast-cpu", "voc07-mini-fast-cpu", False),
        ("bccd-fast", "voc07-mini-fast", True),
    ],
)
def test_the_bccd_twins_are_the_voc07_mini_ones_on_other_data(bccd, voc, scaled):
    pf = PipelineFile(PIPELINES)
    ours, theirs = _flat(pf.load(bccd)), _flat(pf.load(voc))
    differ = {k for k in ours if ours[k] != theirs[k]}
    schedule = {"finetune.max_iter", "finetune.step_size"} if scaled else set()
    assert differ == {"name", "description", "data.root", "data.classes"} | schedule
    assert ours["data.classes"] == ("Platelets", "RBC", "WBC") and ours["data.root"].endswith("bccd")
    # The papers' schedules, scaled from VOC2007's 5011 trainval images to bccd's 292 as voc07-mini's are to 775.
    for key in schedule:
        assert ours[key] == pytest.approx(theirs[key] * 292 / 775, rel=0.01)
    # Every twin finds its R-CNN twin's proposals: the same data and proposal settings.
    rcnn = pf.load("bccd-cpu" if bccd.endswith("-cpu") else "bccd")
    assert (pf.load(bccd).data, pf.load(bccd).proposals) == (rcnn.data, rcnn.proposals)


def test_devkit_root_from_the_environment_or_the_command_line(devkit, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RCNN_VOC2007", raising=False)
    code, out, _ = run_cli(["config", "voc07", "--set", f"data.root={devkit}", "--pipelines-file", str(PIPELINES)], capsys)
    assert code == 0 and f"root: {devkit}" in out and "# --set" in out
    code, out, _ = run_cli(["pipelines", "--pipelines-file", str(PIPELINES)], capsys)
    block = out.split("  voc07:")[1].split("\n  voc07-")[0]
    assert "not there: set RCNN_VOC2007 or --set data.root=PATH" in block and "hardware: a GPU (CUDA)" in block
    assert "weights: torchvision's ImageNet alexnet" in block and "alexnet-owt-" in block

    monkeypatch.setenv("RCNN_VOC2007", str(devkit))
    for name in ("voc07", "voc07-spp", "voc07-spp5", "voc07-vgg16", "voc07-spp-vgg16"):
        assert PipelineFile(PIPELINES).load(name).data.root == str(devkit)
    code, out, _ = run_cli(["pipelines", "--pipelines-file", str(PIPELINES)], capsys)
    assert f"data: {devkit}\n" in out.split("  voc07:")[1]
    # The official split files are read as they are; the per-class lists beside them are not splits.
    ids = VOCDataset(devkit, "trainval").ids
    assert ids == devkit.joinpath("ImageSets/Main/trainval.txt").read_text().split()


def test_imagenet_weights_offline_is_one_line_naming_the_file(devkit, tmp_path, capsys, monkeypatch):
    import torchvision.models._api

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known\n(proxy said no)")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    from rcnn.modeling.checkpoints import imagenet_state_dict

    with pytest.raises(UserError) as e:
        imagenet_state_dict("alexnet")
    assert "\n" not in str(e.value) and str(expected) in str(e.value) and "https://download.pytorch.org/models/" in str(e.value)

    # The same through a stage that loads them: SPP-net's conv maps, before any image is read.
    device = f"model.device={TEST_DEVICE}"
    argv = ["convmaps", "voc07-spp", "--set", f"data.root={devkit}", "--set", "data.classes=null", "--set", device]
    code, _, err = run_cli([*argv, "--runs-dir", str(tmp_path / "runs"), "--pipelines-file", str(PIPELINES), "--quiet"], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("rcnn: error: cannot load ImageNet weights for alexnet") and str(expected) in lines[0]


def test_voc07_then_spp5_run_end_to_end_on_a_devkit_layout(devkit, tmp_path, capsys):
    runs = tmp_path / "runs"
    common = ["--runs-dir", str(runs), "--pipelines-file", str(PIPELINES), "--quiet", "--set", f"data.root={devkit}"]
    small = [a for s in SMALL for a in ("--set", s)]
    code, out, err = run_cli(["run", "voc07", *common, *small], capsys)
    assert code == 0, err
    assert "mAP" in out and (runs / "voc07" / "evaluate" / "test" / "results.json").is_file()
    assert "note: pipeline 'voc07' is sized for a GPU (hardware: gpu) but runs on the CPU" in err

    # SPP-net's five scales, on the trunk fine-tuned above (the pipeline's is ImageNet's AlexNet).
    code, out, err = run_cli(["run", "voc07-spp5", *common, *small, "--set", "model.weights=pipeline:voc07"], capsys)
    assert code == 0, err
    assert "proposals/trainval: identical inputs and parameters" in out  # voc07's, shared
    convmaps = json.loads((runs / "voc07-spp5" / "convmaps" / "test" / "manifest.json").read_text())
    assert convmaps["params"]["scales"] == [480, 576, 688, 864, 1200]
    results = json.loads((runs / "voc07-spp5" / "evaluate" / "test" / "results.json").read_text())
    assert 0 <= results["mAP"] <= 1 and set(results["per_class"]) == {"circle", "cross", "square", "star", "triangle"}
