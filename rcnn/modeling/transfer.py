"""Copies from the host to a GPU that do not stall it.

A copy from ordinary (pageable) host memory to a GPU first waits for everything already queued on the
device to finish (CUDA's documented behaviour for such copies), so a small upload in the middle of a loop,
a mini-batch's labels or a chunk's boxes, leaves the GPU idle while the host queues the next work. From
page-locked (pinned) memory the copy is queued like a kernel and the host goes on at once.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """``array`` as a tensor on ``device``. On a GPU the copy goes from page-locked memory without a wait
    (PyTorch keeps that memory until the copy is done); elsewhere it is ``torch.from_numpy(array)`` (CPU),
    or a plain copy."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cpu":
        return tensor
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
