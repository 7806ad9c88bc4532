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


def test_a_host_copy_gives_exactly_what_to_float16_gives():
    from rcnn.modeling.inference import to_float16
    from rcnn.modeling.transfer import HostCopy

    torch.manual_seed(0)
    tensors = {"fc7": torch.randn(7, 5) * 1e4, "pool5": torch.randn(7, 3, dtype=torch.bfloat16), "none": torch.zeros(0, 4)}
    copy = HostCopy(tensors)
    tensors["fc7"].zero_()  # the copy was taken when it was made
    arrays = copy.arrays()
    assert list(arrays) == ["fc7", "pool5", "none"]
    torch.manual_seed(0)
    expected = {"fc7": torch.randn(7, 5) * 1e4, "pool5": torch.randn(7, 3, dtype=torch.bfloat16), "none": torch.zeros(0, 4)}
    for k, v in expected.items():
        want = to_float16(v)
        assert arrays[k].dtype == np.float16 and arrays[k].shape == want.shape
        assert arrays[k].tobytes() == want.tobytes(), k
