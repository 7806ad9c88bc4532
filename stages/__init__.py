"""Pipeline stages, in the order a run executes them."""

from . import evaluate, features, finetune, proposals, train_bbox, train_svm

STAGES = {
    "proposals": proposals,
    "finetune": finetune,
    "features": features,
    "train-svm": train_svm,
    "train-bbox": train_bbox,
    "evaluate": evaluate,
}
