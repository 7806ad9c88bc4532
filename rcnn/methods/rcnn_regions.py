"""R-CNN's features: every region warped to the network's input size, with context, and run through the CNN."""

from __future__ import annotations

import numpy as np
import torch

from rcnn.modeling.inference import inference_autocast, to_float16
from rcnn.modeling.models import DetectorNet, normalise_crops
from rcnn.modeling.warp import warp_regions


@torch.no_grad()
def region_features(
    model: DetectorNet, image_rgb: np.ndarray, boxes: np.ndarray, layers: tuple[str, ...], context_pad: int, batch_size: int = 256
) -> dict[str, np.ndarray]:
    """Layer outputs (float16 ``[N, D]``) of the warped ``boxes [N, 4]`` (x1, y1, x2, y2) of one RGB image."""
    spec = model.spec
    device = next(model.parameters()).device
    out: dict[str, list[np.ndarray]] = {layer: [] for layer in layers}
    for start in range(0, len(boxes), batch_size):
        crops = warp_regions(image_rgb, boxes[start : start + batch_size], spec.input_size, context_pad, spec.mean_pixel)
        with inference_autocast(device):
            feats = model.extract(normalise_crops(crops, spec, device), layers)
        for layer in layers:
            out[layer].append(to_float16(feats[layer]))
    dims = {"pool5": spec.pool5_dim, "fc6": spec.fc_dim, "fc7": spec.fc_dim}
    return {k: np.concatenate(v) if v else np.zeros((0, dims[k]), np.float16) for k, v in out.items()}
