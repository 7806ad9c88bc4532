"""Pipeline stages, in the order a run executes them."""

from . import convmaps, evaluate, features, finetune, proposals, train_bbox, train_svm

# Every stage in run order; `convmaps` belongs to SPP-net pipelines only.
STAGES = {
    "proposals": proposals,
    "convmaps": convmaps,
    "finetune": finetune,
    "features": features,
    "train-svm": train_svm,
    "train-bbox": train_bbox,
    "evaluate": evaluate,
}
SPP_ONLY = ("convmaps",)


def pipeline_stages(method: str) -> dict:
    """The stages a pipeline of ``method`` ("rcnn" or "spp") runs, in order."""
    return {name: stage for name, stage in STAGES.items() if method == "spp" or name not in SPP_ONLY}
