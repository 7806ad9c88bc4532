"""Pipeline stages, in the order a run executes them."""

from . import convmaps, evaluate, features, finetune, proposals, train_bbox, train_svm
from .methods import method_named

# Every stage in run order; `convmaps` belongs to SPP-net pipelines only (its method's extra stage), and Fast R-CNN
# pipelines run neither train-svm nor train-bbox (its network scores and moves the boxes itself).
STAGES = {
    "proposals": proposals,
    "convmaps": convmaps,
    "finetune": finetune,
    "features": features,
    "train-svm": train_svm,
    "train-bbox": train_bbox,
    "evaluate": evaluate,
}
METHOD_STAGES = ("convmaps",)  # run only by the methods naming them in their `extra_stages`


def pipeline_stages(method: str) -> dict:
    """The stages a pipeline of ``method`` ("rcnn", "spp" or "fast") runs, in order."""
    m = method_named(method)
    return {
        name: stage
        for name, stage in STAGES.items()
        if (name not in METHOD_STAGES or name in m.extra_stages) and name not in m.skipped_stages
    }
