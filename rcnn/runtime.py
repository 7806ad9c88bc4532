"""Process-wide settings for long CPU jobs, applied by the ``rcnn`` command (not on import), and warnings kept off stderr."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import warnings

from threadpoolctl import threadpool_limits

# glibc's mallopt() parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

#: Set to 0 to leave the C allocator as it is.
ENV_KEEP_FREED_MEMORY = "RCNN_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed memory for later allocations instead of handing it back.

    By default glibc serves every allocation above a threshold (32 MB at most) with its own
    ``mmap`` and unmaps it when freed, so every large tensor pays one page fault per 4 KB page
    on first touch, every time it is allocated. R-CNN allocates hundreds of MB of activations
    per batch of crops; on a 2-core CPU its feature extraction spent more time in the kernel
    than in the network (SqueezeNet, 300 crops of 128 px: 1.2 s per image, 0.5 s with this;
    ``benchmarks/bench_features.py`` with and without ``--default-malloc``). The cost: the
    process keeps the memory of its largest moment until it exits. PyTorch's CPU tuning guide makes the same point and
    suggests jemalloc or tcmalloc, which work as well (and make this call irrelevant).

    Returns whether the setting took effect: only on Linux with glibc, and not when the
    environment variable ``RCNN_KEEP_FREED_MEMORY`` is ``0``.
    """
    if os.environ.get(ENV_KEEP_FREED_MEMORY, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter already runs on
    except AttributeError:  # not glibc (musl has none)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # No mmap for large blocks (they come from the heap and are reused), and no trimming of the
    # heap's top below 2 GB of free space.
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def release_freed_memory() -> bool:
    """Hand the heap's free memory back to the system (glibc's ``malloc_trim``); whether it could.

    With :func:`keep_freed_memory` a process keeps the memory of its largest moment, which is what a
    long per-image loop wants and what a chain of stages in one process (``rcnn run``) must not do: each
    stage's peak stayed resident under the next one's. A full-setting SPP-net run on voc07-mini was
    killed for memory on a 24 GB machine at box regression, holding 22.5 GB where that stage alone
    peaks at 11 GB. The stage runner calls this after every stage.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except AttributeError:  # not glibc
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True


def release_device_caches() -> bool:
    """Hand a GPU's cached memory back after a stage: the device's free blocks, and the page-locked host buffers
    the stage's asynchronous copies to the host went through (PyTorch keeps both for reuse until the process ends;
    the features stage's reach a few GB of host memory the system cannot page out). Whether CUDA was in use."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return False
    torch.cuda.empty_cache()
    empty_host = getattr(torch._C, "_host_emptyCache", None)  # no public name for it in torch 2.14
    if empty_host is not None:
        empty_host()
    return True


def one_blas_thread() -> threadpool_limits:
    """Context manager: numpy's BLAS on one thread, for per-image loops that mix numpy and torch.

    After each call OpenBLAS's worker threads keep spinning for a while, taking the cores from
    torch's threads. Pooling SPP-net's pyramid between SVM scores and box regression (numpy)
    ran 4x slower that way in evaluation on 2 cores (28 ms against 6 ms per demo image). The
    price is paid by large products: on voc07-mini SPP-net's box regression (25,600-d) takes
    70 ms per image instead of 49, while its pooling drops from 31 ms to 13, about even.
    """
    return threadpool_limits(limits=1, user_api="blas")


@contextlib.contextmanager
def quiet_matplotlib():
    """Keep matplotlib's font and legend warnings off stderr while figures are drawn (also a decorator).

    A class name in a script the font lacks is drawn as boxes, and a class without a curve
    has an empty legend: neither is for the user to fix, and a warning per figure buried
    the command's own output.
    """
    fonts = logging.getLogger("matplotlib.font_manager")
    level = fonts.level
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph .* missing from", category=UserWarning)
        warnings.filterwarnings("ignore", message="No artists with labels found to put in legend", category=UserWarning)
        fonts.setLevel(logging.ERROR)  # "findfont: Font family ... not found"
        try:
            yield
        finally:
            fonts.setLevel(level)


def tf32_off() -> tuple[bool, bool]:
    """Turn TF32 off for cuDNN's convolutions and for matrix products (float32 stays float32 on NVIDIA cards);
    returns the two flags as they were."""
    import torch

    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    return flags


@contextlib.contextmanager
def strict_float32(enabled: bool = True):
    """With ``enabled``, float32 convolutions and matrix products in float32 on NVIDIA cards too: PyTorch lets cuDNN
    use TF32 (a 10-bit mantissa) for convolutions by default. The flags are restored afterwards."""
    import torch

    if not enabled:
        yield
        return
    flags = tf32_off()
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
