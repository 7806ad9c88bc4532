"""to_device: the host array's values on the device (on a CPU, its own memory, as torch.from_numpy)."""

from __future__ import annotations

import numpy as np
import torch

from rcnn.modeling.transfer import to_device


def test_on_a_cpu_the_tensor_is_the_arrays_memory_and_values():
    a = np.arange(12, dtype=np.int64).reshape(3, 4)
    t = to_device(a, torch.device("cpu"))
    assert t.dtype == torch.int64 and t.tolist() == a.tolist()
    a[0, 0] = 99  # the same memory, as torch.from_numpy gives
    assert int(t[0, 0]) == 99


def test_a_strided_array_is_copied_in_order():
    a = np.arange(20, dtype=np.float32).reshape(4, 5)[:, ::2]
    t = to_device(a, torch.device("cpu"))
    assert t.is_contiguous() and np.array_equal(t.numpy(), a)
