"""Copies from the host to a GPU that do not stall it.

A copy from ordinary (pageable) host memory to a GPU first waits for everything already queued on the
device to finish (CUDA's documented behaviour for such copies), so a small upload in the middle of a loop,
a mini-batch's labels or a chunk's boxes, leaves the GPU idle while the host queues the next work. From
page-locked (pinned) memory the copy is queued like a kernel and the host goes on at once.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.profiler import record_function


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


class HostCopy:
    """Tensors on their way to the host as float16 numpy arrays (the feature caches' type), exactly as
    :func:`rcnn.modeling.inference.to_float16` gives them.

    On a GPU the copies are queued behind the work that makes them, into page-locked memory, with an event
    after them, and the host goes on at once: it can queue the next image's work before it waits, in
    :meth:`arrays`, for this one's, so the GPU does not idle while the host prepares each image. Elsewhere
    the copies are made at once.
    """

    def __init__(self, tensors: dict[str, torch.Tensor]):
        half = {k: v.detach().to(torch.float16).contiguous() for k, v in tensors.items()}
        devices = {t.device for t in half.values() if t.device.type == "cuda"}
        self._event = None
        if devices:
            self._host = {k: t.to("cpu", non_blocking=True) for k, t in half.items()}
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(devices.pop()))
        else:
            self._host = {k: t.cpu() for k, t in half.items()}

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays, once the copies are done (on a GPU, the wait for this image's work)."""
        with record_function("rcnn.to_host"):
            if self._event is not None:
                self._event.synchronize()
            return {k: t.numpy() for k, t in self._host.items()}
