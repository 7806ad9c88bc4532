"""The pipeline configuration's shape: one frozen dataclass per section, every field declared with its default,
its doc and its range (:func:`rcnn.config.fields.setting`); docs/pipelines.md is generated from them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rcnn.config.fields import Range, setting


@dataclass(frozen=True)
class SyntheticConfig:
    """Synthetic shapes data, generated under the runs folder when missing."""

    images: int = setting(60, "number of images, a third of them the test split", ge=2)
    seed: int = setting(0, "the same seed gives identical files", ge=0)
    size: int = setting(256, "image side in pixels", ge=64)


@dataclass(frozen=True)
class DataConfig:
    """A VOC-layout dataset: a root folder and the names of its two splits."""

    root: str | None = setting(None, "dataset folder (JPEGImages/, Annotations/, ImageSets/Main/); null: synthetic", path=True)
    trainval: str = setting("trainval", "split the detector learns from (ImageSets/Main/NAME.txt)")
    test: str = setting("test", "split it is scored on")
    classes: tuple[str, ...] | None = setting(None, "class names; null: the sorted object names of the trainval split")
    synthetic: SyntheticConfig | None = setting(None, "generate shapes data under the runs folder when root is null")
    other_classes: Literal["error", "ignore"] = setting(
        "error",
        "objects of classes not in data.classes: error refuses them before any stage; ignore leaves them out of the "
        "annotations, to detect a subset of a dataset's classes (their regions are then background, and not scored)",
        fingerprint=False,  # a unit completes under error only where there are none, which ignore reads alike
    )
    clip_boxes: bool = setting(
        False,
        "clip boxes that reach past the image (a 0-based xmin of 0, an xmax of width + 1, as some annotation tools "
        "export) to its edge; false refuses such an image, naming the box (VOC's own boxes lie inside)",
        fingerprint=False,  # a unit completes without clipping only where no box needs it, which clipping reads alike
    )
    use_difficult: bool = setting(
        True,
        "train on objects marked difficult too (R-CNN's and SPP-net's releases: yes, their roidb_from_voc.m keeps "
        "every object; py-faster-rcnn: no); scoring always ignores them, as the devkit",
    )


@dataclass(frozen=True)
class ProposalsConfig:
    """Selective search (Uijlings et al., IJCV 2013) as R-CNN ran it."""

    mode: Literal["fast", "opencv-fast", "opencv-quality", "single"] = setting(
        "fast", "fast: Uijlings' fast mode as R-CNN ran it (HSV+Lab, k = 50/100, two strategies); single: one strategy"
    )
    resize_width: int | None = setting(
        None,
        "resize to this width before the search, boxes mapped back (R-CNN's release searched VOC at full size; its "
        "rcnn_detect.m demo at 500); null: as is",
        ge=16,
    )
    # The search's time and memory grow faster than the pixel count (a 6000 x 6000 photo: 14 min, 6.3 GB), and
    # Uijlings' segment sizes (k = 50/100) were set for VOC's 500 x 375 (0.19 Mpx); 1 Mpx leaves VOC and the demo as is.
    max_pixels: int | None = setting(
        1_000_000,
        "an image over this many pixels (after resize_width) is searched scaled down to it, boxes mapped back, "
        "with a log line; null: no limit",
        ge=64,
    )
    min_size: float = setting(20.0, "drop boxes narrower or shorter than this, in pixels (Uijlings' demo: 20)", ge=0)
    max_proposals: int | None = setting(None, "keep at most this many boxes in the search's own ranking; null: all (R-CNN)", ge=1)
    seed: int = setting(0, "seed of the search's random ranking", ge=0)
    n_jobs: int = setting(-1, "worker processes; -1: all cores", ge=1, also=(-1,), fingerprint=False)


@dataclass(frozen=True)
class ModelConfig:
    """The CNN: backbone, its initialisation and where it runs."""

    backbone: Literal["alexnet", "vgg16", "squeezenet1_0", "tiny"] = setting(
        "alexnet", "the CNN (R-CNN: AlexNet, 'T-Net', or VGG16, 'O-Net'; tiny: a small CNN for the demo)"
    )
    weights: str = setting(
        "imagenet",
        "imagenet (torchvision's weights), scratch, a state-dict file, or pipeline:NAME (another pipeline's fine-tuned model)",
        path=True,
        keywords=("imagenet", "scratch"),
    )
    input_size: int | None = setting(
        None,
        "side of the warped region; null: the backbone's own (227 AlexNet as R-CNN, 227 SqueezeNet, 224 VGG16, 64 tiny)",
        ge=16,
    )
    fc_dim: int | None = setting(
        None,
        "width of fc6/fc7: new layers for squeezenet1_0 and tiny (null: 1024 / 256); alexnet and vgg16 keep their "
        "pretrained 4096 (null or 4096 only)",
        ge=1,
    )
    seed: int = setting(0, "seed of the weights drawn afresh", ge=0)
    device: Literal["auto", "cpu", "cuda"] = setting("auto", "auto: CUDA when present, else the CPU", fingerprint=False)
    precision: Literal["auto", "float32", "bfloat16"] = setting(
        "auto",
        "arithmetic of fine-tuning (autocast) and feature extraction (the weights cast once): auto: bfloat16 on a "
        "GPU, float32 on a CPU; bfloat16 on a CPU too pays where the processor has bfloat16 matrix units (R-CNN's "
        "features 1.7x faster on an Intel Xeon with AMX) and may cost where it has none; float32 on a GPU gives "
        "reference numbers (TF32, PyTorch's default for convolutions on NVIDIA cards, is turned off)",
    )
    warp: Literal["auto", "opencv", "torch"] = setting(
        "auto",
        "R-CNN, fine-tuning and features: where regions are warped; opencv on the host (uint8 crops), torch on the "
        "model's device (torchvision roi_align, float crops), auto: OpenCV on a CPU, torch on a GPU",
    )
    overlap_io: bool = setting(
        True,
        "background threads read the next images (convmaps, features: decoding them, or reading their conv maps) "
        "and write full record parts (convmaps, features, evaluate) while the model computes, and convmaps and "
        "features queue an image's work on the device before they wait for the previous image's, so a GPU need not "
        "wait on the host; false: one step after another. The records are the same bytes",
        fingerprint=False,
    )


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning on warped regions (R-CNN section 2.3)."""

    context_pad: int = setting(16, "pixels of context around each warped region (R-CNN appendix A: p = 16)", ge=0)
    fg_threshold: float = setting(0.5, "IoU with an object at which a region is that class (R-CNN: 0.5)", gt=0, le=1)
    bg_low: float = setting(0.0, "least IoU of a background region (R-CNN: 0, every other region; SPP-net: 0.1)", ge=0, lt=1)
    batch_size: int = setting(128, "regions per mini-batch (R-CNN: 128)", ge=1)
    fg_fraction: float = setting(0.25, "share of foreground regions in a mini-batch (R-CNN: 32 of 128)", gt=0, le=1)
    mirror: bool = setting(
        True, "horizontal flips (R-CNN's data layer mirrors crops; SPP-net's code fine-tunes on the mirror images' maps)"
    )
    optimizer: Literal["sgd", "adam"] = setting("sgd", "sgd as R-CNN; adam for small networks trained from scratch (demo)")
    lr: float = setting(0.001, "learning rate (R-CNN: 0.001, a tenth of the pre-training rate)", gt=0)
    momentum: float = setting(0.9, "SGD momentum (R-CNN: 0.9)", ge=0, lt=1)
    weight_decay: float = setting(0.0005, "weight decay (R-CNN: 0.0005)", ge=0)
    bias_lr_mult: float = setting(
        2.0, "biases' learning rate over lr (R-CNN's and SPP-net's fine-tuning prototxts: blobs_lr 2 on biases)", gt=0
    )
    bias_decay: bool = setting(
        False, "weight decay on biases too (R-CNN's prototxt: weight_decay 0 on biases; SPP-net's decays fc6's and fc7's)"
    )
    classifier_lr_mult: float = setting(
        10.0, "the new classifier's learning rate over lr (R-CNN's fc8_pascal: blobs_lr 10; SPP-net's: 1)", gt=0
    )
    max_iter: int = setting(40000, "SGD iterations", ge=1)
    step_size: int = setting(20000, "multiply lr by gamma every step_size iterations", ge=1)
    gamma: float = setting(0.1, "learning-rate decay factor", gt=0, le=1)
    eval_every: int = setting(1000, "validate and checkpoint every this many iterations", ge=1)
    val_fraction: float = setting(0.1, "share of trainval images held out for validation accuracy", ge=0, lt=1)
    seed: int = setting(0, "seed of sampling, flips and the new layers' weights", ge=0)


@dataclass(frozen=True)
class FeaturesConfig:
    """Cached CNN features of every proposal and ground-truth box."""

    layers: tuple[str, ...] = setting(("pool5", "fc7"), "layers cached (R-CNN: fc7 for the SVMs, pool5 for box regression)")
    batch_size: int = setting(256, "regions per forward pass", ge=1, fingerprint=False)
    bbox_rows: Literal["all", "regression"] = setting(
        "all",
        "R-CNN, where bbox.layer is not svm.layer: which rows cache bbox.layer. all: every box of every split (R-CNN's "
        "cache; pool5 of 2000 boxes is 37 MB per image with AlexNet); regression: only the trainval rows box regression "
        "trains on (IoU >= bbox.min_overlap with a usable object), none of the test split, whose rows evaluate "
        "computes again from the image with the fine-tuned model. Changing it, or bbox.min_overlap under regression, "
        "recomputes features",
    )


@dataclass(frozen=True)
class SVMConfig:
    """Per-class linear SVMs with hard-negative mining (R-CNN's released rcnn_train.m)."""

    layer: str = setting("fc7", "feature the SVMs read (R-CNN: fc7 of the fine-tuned network)")
    C: float = setting(0.001, "liblinear's C (R-CNN: 0.001)", gt=0)
    pos_loss_weight: float = setting(2.0, "weight of positives' loss (R-CNN: 2)", gt=0)
    bias_mult: float = setting(10.0, "bias feature value, so the bias is barely regularised (R-CNN: 10)", gt=0)
    neg_overlap: float = setting(
        0.3, "proposals below this IoU with every object of the class are negatives (R-CNN: 0.3)", ge=0, le=1
    )
    neg_max_mutual_overlap: float | None = setting(
        None, "drop negatives overlapping another negative by more than this (SPP-net: 0.7); null: keep all", gt=0, le=1
    )
    hard_threshold: float = setting(-1.0001, "a negative scoring above this is hard and joins the cache (R-CNN: -1.0001)")
    evict_threshold: float = setting(-1.2, "cached negatives scoring below this are evicted (R-CNN: -1.2)")
    retrain_limit: int = setting(2000, "retrain once this many new hard negatives are found (R-CNN: 2000)", ge=1)
    target_norm: float = setting(20.0, "features scaled to this mean norm (R-CNN: 20)", gt=0)
    n_jobs: int = setting(-1, "classes trained in parallel; -1: all cores", ge=1, also=(-1,), fingerprint=False)


@dataclass(frozen=True)
class BBoxConfig:
    """Class-specific ridge box regression from pool5 (R-CNN appendix C)."""

    layer: str = setting("pool5", "feature the regressors read (R-CNN: pool5)")
    min_overlap: float = setting(
        0.6, "train on proposals with at least this IoU with an object (R-CNN: 0.6; SPP-net: 0.5)", ge=0, le=1
    )
    ridge_lambda: float = setting(1000.0, "ridge penalty (R-CNN: 1000)", ge=0)


@dataclass(frozen=True)
class EvaluateConfig:
    """Test-time detection and scoring."""

    nms_threshold: float = setting(0.3, "per-class greedy NMS IoU (R-CNN: 0.3)", gt=0, le=1)
    top_per_image: int | None = setting(
        100,
        "proposals per class and image, best SVM scores first, that go on to box regression and NMS (R-CNN's "
        "rcnn_test.m: 100); null: all",
        ge=1,
    )
    top_per_set: int | None = setting(
        40,
        "then, per class, only the best this many per test image on average over the split are kept (rcnn_test.m: "
        "100,000 per 2,500 images, before NMS); null: no such cap",
        ge=1,
    )
    max_per_image: int = setting(100, "detections kept per class and image after NMS", ge=1)
    metric: Literal["voc07", "voc10"] = setting("voc07", "voc07: 11-point AP (VOC2007 devkit); voc10: all-point AP")


@dataclass(frozen=True)
class SPPConfig:
    """SPP-net (He et al., ECCV 2014): conv maps once per image, windows pooled from them."""

    levels: tuple[int, ...] = setting((6, 3, 2, 1), "pyramid levels, n x n bins each (SPP-net: 6, 3, 2, 1; 50 bins)", ge=1)
    scales: tuple[int, ...] = setting(
        (688,), "shorter image side of each scale (SPP-net: 688, or 480, 576, 688, 864, 1200 for five)", ge=16
    )
    max_side: int | None = setting(2000, "cap on the longer side after resizing; null: none", ge=16)
    target_size: int = setting(
        224, "pool each window at the scale where its area is closest to this squared (SPP-net: 224)", ge=1
    )
    fc6_input_rms: float | None = setting(
        1.0,
        "not from the paper: fc6's input scaled to this RMS, measured on training windows (SqueezeNet's pyramids "
        "have norms ~17,000); null: unscaled",
        gt=0,
    )
    offset: float | Literal["trunk"] = setting(
        "trunk",
        "where conv cell j centres: stride * j + offset; trunk: worked out from the layers, as SPP-net's appendix says "
        "(tiny 3, AlexNet 15, VGG16 7.5, SqueezeNet 17); 0: the formula as printed",
    )
    random_scale: bool = setting(
        False, "fine-tuning pools each window at a random scale (SPP-net's code: random_scale = 1); off: the closest"
    )


@dataclass(frozen=True)
class FastConfig:
    """Fast R-CNN (Girshick, ICCV 2015): the whole network trained on RoIs pooled from whole images."""

    scales: tuple[int, ...] = setting(
        (600,),
        "shorter image side(s) (Fast R-CNN: 600). Several: training resizes each image to one drawn at random per step, "
        "testing runs every scale and pools each region at the one where it is closest to 224 x 224 (section 5.2: "
        "480, 576, 688, 864, 1200, longer side at most 2000)",
        ge=16,
    )
    max_side: int | None = setting(1000, "cap on the longer side after resizing (Fast R-CNN: 1000); null: none", ge=16)
    images_per_batch: int = setting(
        2, "images per mini-batch, finetune.batch_size regions shared among them (Fast R-CNN: 2, 64 RoIs each)", ge=1
    )
    box_loss_weight: float = setting(1.0, "weight of the smooth L1 box loss beside the log loss (Fast R-CNN: lambda 1)", ge=0)
    frozen_convs: int | None = setting(
        None,
        "leading conv layers kept fixed; null: the paper's for the backbone (conv1 of AlexNet and SqueezeNet, "
        "conv1_1 to conv2_2 of VGG16, none of tiny)",
        ge=0,
    )
    fc6_input_rms: float | None = setting(
        None,
        "not from the paper: fc6's input scaled to this RMS, measured on training RoIs, where fc6 is new (SqueezeNet's "
        "RoI-pooled vectors are large, as its pyramids are for spp.fc6_input_rms); null: unscaled, as fc6 pretrained",
        gt=0,
    )
    svd_fc6: int | None = setting(
        None,
        "test time only: fc6 replaced by its truncated SVD of this rank, two smaller layers, for faster detection "
        "(Fast R-CNN section 3.1: 1024 of VGG16's 4096; a rank that would not save work keeps the layer); null: fc6 as "
        "trained. Changes stage features, not fine-tuning",
        ge=1,
    )
    svd_fc7: int | None = setting(
        None,
        "test time only: fc7's truncated SVD rank (Fast R-CNN: 256 of VGG16's 4096); null: fc7 as trained",
        ge=1,
    )


@dataclass(frozen=True)
class ClusterConfig:
    """Where per-image and per-class work runs (a Dask cluster; docs/cluster.md). Never part of a fingerprint."""

    address: str | None = setting(
        None,
        "local:N (a LocalCluster of N worker processes), tcp://HOST:PORT (a running `dask scheduler`), or slurm "
        "(workers started through dask-jobqueue); null: this process, as without a cluster. --cluster and "
        "$RCNN_CLUSTER override it",
    )
    shard_images: int | None = setting(
        None, "images per shard (one task), rounded up to whole part files; null: about 8 shards per worker", ge=1
    )
    connect_timeout: float = setting(20.0, "tcp: seconds to keep trying to reach the scheduler before giving up", gt=0)
    queue: str | None = setting(None, "slurm: the partition workers are submitted to; null: the site's default")
    cores: int = setting(4, "slurm: cores per job (one worker process, one thread per core)", ge=1)
    memory: str = setting("16GB", "slurm: memory per job")
    gpus: int = setting(0, "slurm: GPUs per job (--gres=gpu:N); its worker takes the GPU stages", ge=0)
    walltime: str = setting("02:00:00", "slurm: time limit of each job")
    jobs: int = setting(2, "slurm: jobs (workers) to start", ge=1)


@dataclass(frozen=True)
class PipelineConfig:
    """One named pipeline: everything a run needs, resolved."""

    name: str
    description: str = setting("", "one line shown by `rcnn pipelines`")
    hardware: Literal["cpu", "gpu"] | None = setting(
        None,
        "what a run is sized for, shown by `rcnn pipelines` and `rcnn run`: gpu (CUDA; far slower on a CPU), "
        "cpu (a CPU is enough); null: not stated. A statement, not a check",
        fingerprint=False,
    )
    method: Literal["rcnn", "spp", "fast"] = setting(
        "rcnn",
        "rcnn: warp every region through the whole CNN; spp: conv maps once per image, pyramid-pool each window; "
        "fast: Fast R-CNN, RoI-pool each region from the image's conv map, classes and boxes learnt with the network",
    )
    data: DataConfig = setting(DataConfig(), "the dataset")
    proposals: ProposalsConfig = setting(ProposalsConfig(), "selective search")
    model: ModelConfig = setting(ModelConfig(), "the CNN")
    finetune: FinetuneConfig = setting(FinetuneConfig(), "fine-tuning")
    features: FeaturesConfig = setting(FeaturesConfig(), "the feature cache")
    svm: SVMConfig = setting(SVMConfig(), "the class SVMs")
    bbox: BBoxConfig = setting(BBoxConfig(), "box regression")
    evaluate: EvaluateConfig = setting(EvaluateConfig(), "detection and scoring")
    spp: SPPConfig = setting(SPPConfig(), "SPP-net (method: spp)")
    fast: FastConfig = setting(FastConfig(), "Fast R-CNN (method: fast)")
    cluster: ClusterConfig = setting(ClusterConfig(), "where the work runs (Dask)", fingerprint=False)


# The warped-region sizes each backbone accepts: fc6 of AlexNet and VGG16 is ImageNet's and reads a 6 x 6 / 7 x 7
# pool5 grid; SqueezeNet and tiny need their layers to leave at least one cell.
INPUT_SIZES = {
    "alexnet": Range(ge=223, le=254),
    "vgg16": Range(ge=224, le=255),
    "squeezenet1_0": Range(ge=48),
    "tiny": Range(ge=16),
}
