"""What the benchmark scripts share: the machine and library versions they print, clocks that wait for
the GPU, the library's per-image feature paths (R-CNN and SPP-net), test data and boxes.

Benchmarks run as scripts (``python benchmarks/NAME.py``), so their folder is on ``sys.path`` and
``import common`` finds this module; it puts the checkout first too, so ``rcnn`` is this checkout's.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import cv2  # noqa: E402

from rcnn.data.splitfile import read_split_file  # noqa: E402
from rcnn.errors import UserError  # noqa: E402
from rcnn.methods.rcnn_regions import region_features  # noqa: E402
from rcnn.methods.spp_regions import image_maps, spp_region_features  # noqa: E402
from rcnn.modeling.checkpoints import initialise  # noqa: E402
from rcnn.modeling.inference import for_inference  # noqa: E402
from rcnn.modeling.spp_geometry import image_scales  # noqa: E402
from rcnn.runtime import keep_freed_memory  # noqa: E402
from rcnn.stages.methods import build_method  # noqa: E402
from rcnn.store.artifacts import runs_dir_option  # noqa: E402
from rcnn.store.machine import cpu_model  # noqa: E402

# ----------------------------------------------------------------------------- machine and versions


def git_commit() -> str:
    """The checkout's commit, with ``+changes`` when tracked files differ from it; ``unknown`` outside git."""
    try:
        run = dict(cwd=REPO, capture_output=True, text=True, timeout=10)
        head = subprocess.run(["git", "rev-parse", "HEAD"], **run)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run).stdout.strip()
        return head.stdout.strip() + ("+changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info(device: torch.device | None = None) -> dict:
    """Processor, cores, GPU (when ``device`` is one), library versions and the git commit, as plain JSON values."""
    import sklearn
    import torchvision

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(device) if device is not None and device.type == "cuda" else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device is not None and device.type == "cuda" else None,
        "torchvision": torchvision.__version__,
        "opencv": cv2.__version__,
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
        "commit": git_commit(),
    }
    return info


def machine_line(info: dict) -> str:
    """:func:`machine_info` as the one or two lines each benchmark ends with."""
    gpu = f"{info['gpu']} (CUDA {info['cuda']}), " if info.get("gpu") else ""
    return (
        f"machine: {gpu}{info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads; "
        f"Python {info['python']}, torch {info['torch']}, torchvision {info['torchvision']}, OpenCV {info['opencv']}, "
        f"numpy {info['numpy']}, scikit-learn {info['scikit-learn']}; commit {info['commit']}"
    )


# ----------------------------------------------------------------------------- clocks


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so that a clock read next counts it (nothing on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds ``fn()`` takes, the GPU's queued work included on both sides."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def alternate(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device, warmup: bool = False) -> dict[str, float]:
    """Median seconds of each function over ``repeats`` rounds, the functions taking turns in every round.

    Taking turns spreads the machine's other load evenly over the methods compared; ``warmup`` first
    calls each once untimed (kernel selection, allocator growth, lazy initialisation).
    """
    if warmup:
        for fn in fns.values():
            timed(fn, device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


# ----------------------------------------------------------------------------- the library's feature paths


def rcnn_image_features(net, image_bgr: np.ndarray, boxes: np.ndarray, context_pad: int, layers=("pool5", "fc7")) -> dict:
    """R-CNN's test-time features of one BGR image's ``boxes [N, 4]`` (x1, y1, x2, y2), as the features stage
    computes them: warp every box, run the whole network on the crops (float16 ``[N, D]`` per layer)."""
    rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
    return region_features(net, rgb, boxes, layers, context_pad)


def spp_image_features(
    net, image_bgr: np.ndarray, boxes: np.ndarray, scales, max_side, target: float, layers=("pool5", "fc7")
) -> dict:
    """SPP-net's test-time features of one BGR image's ``boxes [N, 4]`` (x1, y1, x2, y2): the trunk once per
    scale (as the convmaps stage), every window pyramid-pooled from those maps and the fc layers (as features),
    the maps left on the device in between as the detector leaves them."""
    h, w = image_bgr.shape[:2]
    factors = image_scales(h, w, scales, max_side)
    maps = image_maps(net, image_bgr, factors, to_host=False)
    return spp_region_features(net, maps, factors, boxes, layers, target)


# ----------------------------------------------------------------------------- data


def split_ids(data: Path, split: str) -> list[str]:
    """The image ids of ``split`` of the VOC folder ``data``; a missing split file is one line, not a traceback."""
    split_file = Path(data) / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        raise UserError(f"--data: no split file {split_file} (a VOC folder has ImageSets/Main/<split>.txt)")
    return read_split_file(split_file)  # as the stages read it (UTF-16, VOC's per-class layout)


def subset(data: Path, split: str, n: int, dst: Path, name: str = "bench") -> list[str]:
    """A VOC folder at ``dst`` holding the first ``n`` images of ``split`` of ``data`` as split ``name``
    (symlinks, no copies; nothing is written into ``data``)."""
    ids = split_ids(data, split)[:n]
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
    for i in ids:
        os.symlink((data / "JPEGImages" / f"{i}.jpg").resolve(), dst / "JPEGImages" / f"{i}.jpg")
        os.symlink((data / "Annotations" / f"{i}.xml").resolve(), dst / "Annotations" / f"{i}.xml")
    (dst / "ImageSets" / "Main" / f"{name}.txt").write_text("\n".join(ids) + "\n")
    return ids


def random_boxes(rng: np.random.Generator, width: int, height: int, n: int, objects: np.ndarray) -> np.ndarray:
    """``n`` float32 boxes ``[n, 4]`` (x1, y1, x2, y2) inside a ``width x height`` image, standing in for proposals.

    Half are the ``objects`` boxes ``[G, 4]`` jittered (so that fine-tuning finds foreground, as it does
    among selective search's boxes), half are anywhere, sides log-uniform from 16 px to the image's.
    """
    n_near = n // 2 if len(objects) else 0
    side_lo, side_hi = np.log(min(16.0, width, height)), np.log([width, height])
    w = np.exp(rng.uniform(side_lo, side_hi[0], n))
    h = np.exp(rng.uniform(side_lo, side_hi[1], n))
    cx, cy = rng.uniform(0, width, n), rng.uniform(0, height, n)
    if n_near:
        obj = np.asarray(objects, np.float64)[rng.integers(0, len(objects), n_near)]
        ow, oh = obj[:, 2] - obj[:, 0], obj[:, 3] - obj[:, 1]
        cx[:n_near] = (obj[:, 0] + obj[:, 2]) / 2 + rng.normal(0, 0.1, n_near) * ow
        cy[:n_near] = (obj[:, 1] + obj[:, 3]) / 2 + rng.normal(0, 0.1, n_near) * oh
        w[:n_near] = ow * np.exp(rng.normal(0, 0.15, n_near))
        h[:n_near] = oh * np.exp(rng.normal(0, 0.15, n_near))
    limits = np.array([width, height], np.float64)
    lo = np.clip(np.stack([cx - w / 2, cy - h / 2], axis=1), 0, limits - 1)
    hi = np.clip(np.stack([cx + w / 2, cy + h / 2], axis=1), lo + 1, limits)  # at least a pixel, as selective search's
    return np.concatenate([lo, hi], axis=1).astype(np.float32)


def network(ctx, device: torch.device):
    """The pipeline's network as its method shapes it, with its starting weights, ready for inference."""
    cfg, method = ctx.cfg, build_method(ctx.cfg)
    model = method.untrained_model(ctx)
    if not cfg.model.weights.startswith("pipeline:"):
        initialise(model, ctx.weights()[0])
    if method.whole_images and cfg.spp.fc6_input_rms is not None:
        model.fc6_input_scale.fill_(0.01)  # as fine-tuning sets it (for_inference folds it into fc6)
    return for_inference(model.to(device), whole_images=method.whole_images, dtype=cfg.model.precision)


# ----------------------------------------------------------------------------- scripts on a pipeline's runs folder


def pipeline_options(ap: argparse.ArgumentParser, runs_help: str = "the runs folder") -> None:
    """``--runs-dir``, ``--pipelines-file`` and ``--set``, read as the ``rcnn`` command reads them."""
    ap.add_argument("--runs-dir", type=Path, default=Path(os.environ.get("RCNN_RUNS_DIR", "runs")),
                    help=f"{runs_help} [default: $RCNN_RUNS_DIR or ./runs]")  # fmt: skip
    ap.add_argument("--pipelines-file", type=Path, help="the pipelines YAML [default: as the rcnn command finds it]")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override one configuration value (repeatable)")  # fmt: skip


def subset_options(ap: argparse.ArgumentParser) -> None:
    """``--data``, ``--split`` and ``--images``: the first images of a split of a VOC-layout folder (read by
    :func:`subset`)."""
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "voc07-mini", metavar="DIR",
                    help="a VOC-layout folder (default: voc07-mini in the shared data folder beside the checkout)")  # fmt: skip
    ap.add_argument("--split", default="test", help="split whose first images are measured (default: test)")
    ap.add_argument("--images", type=int, default=40, help="how many images (default: 40)")


def rcnn_command(stage: str, args: argparse.Namespace) -> str:
    """The ``rcnn STAGE PIPELINE`` command that computes what a script on ``args``' runs folder needs, with the
    options that reach that folder and pipeline (a bare one would compute in ./runs, with other settings)."""
    words = ["--pipelines-file", str(args.pipelines_file)] if args.pipelines_file else []
    for text in args.overrides:
        words += ["--set", text]
    options = runs_dir_option(args.runs_dir) + "".join(f" {shlex.quote(w)}" for w in words)
    return f"rcnn {stage} {shlex.quote(args.pipeline)}{options}"


def run_script(name: str, run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``run(args)`` with the allocator setting the ``rcnn`` command makes, a bad input ending in one line."""
    keep_freed_memory()
    return exit_in_one_line(name, lambda: run(args))


def exit_in_one_line(name: str, main: Callable[[], int | None]) -> int:
    """Exit status of ``main()`` (0 for None), a bad input (unknown pipeline, bad ``--set``, missing data) ending
    in one line with the error's status: 2 for a bad pipeline name or ``--set``, as the ``rcnn`` command."""
    try:
        return main() or 0
    except UserError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return e.exit_code
