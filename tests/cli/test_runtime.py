"""The allocator setting the rcnn command applies: large blocks come from the reused heap, not fresh mmaps."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from rcnn.runtime import keep_freed_memory, one_blas_thread

_libc, _version = platform.libc_ver()
glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or _libc != "glibc" or tuple(map(int, _version.split(".")[:2])) < (2, 33),
    reason="glibc 2.33 or later (mallopt, mallinfo2)",
)

# Allocates 64 MB with numpy (malloc underneath) and prints how many bytes glibc mmapped for
# blocks of their own while it was alive (mallinfo2's hblkhd).
PROBE = """
import ctypes, sys
import numpy as np
from rcnn.runtime import keep_freed_memory, one_blas_thread
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
print(keep_freed_memory() if sys.argv[1] == "keep" else "untouched")
block = np.ones(8 << 20)
print(libc.mallinfo2().hblkhd)
"""


def probe(mode: str, env: dict | None = None) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env)
    took, mapped = out.stdout.split()
    return took, int(mapped)


@glibc
def test_large_blocks_come_from_the_heap_once_freed_memory_is_kept():
    assert probe("untouched")[1] >= 64 << 20  # glibc's default: a fresh mmap of its own
    took, mapped = probe("keep")
    assert took == "True" and mapped < 64 << 20


@glibc
def test_the_setting_can_be_turned_off(monkeypatch):
    import os

    took, mapped = probe("keep", {**os.environ, "RCNN_KEEP_FREED_MEMORY": "0"})
    assert took == "False" and mapped >= 64 << 20
    monkeypatch.setenv("RCNN_KEEP_FREED_MEMORY", "0")
    assert keep_freed_memory() is False


def test_one_blas_thread_limits_numpys_blas_inside_and_restores_it_after():
    import numpy as np
    from threadpoolctl import threadpool_info

    np.ones((64, 64)) @ np.ones((64, 64))  # BLAS loaded
    before = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    if not before:
        pytest.skip("numpy has no BLAS thread pool here")
    with one_blas_thread():
        assert all(p["num_threads"] == 1 for p in threadpool_info() if p["user_api"] == "blas")
    assert [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"] == before


# Frees 256 MB of touched heap memory with freed memory kept, and prints the resident size (from
# /proc/self/statm) before and after release_freed_memory().
RELEASE_PROBE = """
import os, sys
import numpy as np
from rcnn.runtime import keep_freed_memory, release_freed_memory
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
assert keep_freed_memory()
block = np.ones(32 << 20)  # 256 MB, every page touched
after = np.ones(1000)  # something above it on the heap
del block
kept = resident()
print(release_freed_memory(), kept, resident())
"""


@glibc
def test_release_freed_memory_hands_a_freed_block_back():
    out = subprocess.run([sys.executable, "-c", RELEASE_PROBE], capture_output=True, text=True, check=True)
    released, kept, now = out.stdout.split()
    assert released == "True"
    assert int(kept) - int(now) >= 200 << 20, (kept, now)  # the 256 MB block was resident and is not any more


def test_the_stage_runner_releases_memory_after_every_stage(pipelines_file, tmp_path, capsys, monkeypatch):
    from conftest import run_cli

    import rcnn.stages.runner as runner

    calls = []
    monkeypatch.setattr(runner, "release_freed_memory", lambda: calls.append(1))
    monkeypatch.setattr(runner, "release_device_caches", lambda: calls.append(2))
    argv = ["proposals", "tiny", "--runs-dir", str(tmp_path / "runs"), "--pipelines-file", str(pipelines_file), "--quiet"]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    assert calls == [1, 2, 1, 2]  # after each split computed


def test_device_caches_are_released_only_where_cuda_was_used(monkeypatch):
    import torch

    from rcnn.runtime import release_device_caches

    assert not torch.cuda.is_initialized() and release_device_caches() is False
    calls = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("device"))
    monkeypatch.setattr(torch._C, "_host_emptyCache", lambda: calls.append("host"), raising=False)
    assert release_device_caches() is True and calls == ["device", "host"]
