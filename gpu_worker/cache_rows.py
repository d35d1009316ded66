"""How the KV cache hands out what it stores (kv_cache.py), and how a kernel that serves several
sequences' caches in one launch finds them. Its own module because both decode attention
(decode_attention.py) and the Triton kernels (decode_attention_kernel.py, fp8_kernel.py), which the
others import, read it: none may import another for it."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Rows(NamedTuple):
    """Cached rows [T, H, d] as stored: `values` in the compute dtype (scales None), or
    float8_e4m3fn with float32 `scales` [T, H, 1], row = values * scales."""

    values: torch.Tensor
    scales: torch.Tensor | None = None

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        if self.scales is None:
            return self.values.to(dtype)
        return (self.values.float() * self.scales).to(dtype)


def element_gap(x: torch.Tensor, base: torch.Tensor) -> int:
    """Where x starts, in elements from base (a batch kernel adds it to base's pointer: each
    sequence's cache is its own allocation, all in one address space)."""
    gap = x.data_ptr() - base.data_ptr()
    if gap % x.element_size():
        raise ValueError("cached rows must sit at whole elements from the first sequence's")
    return gap // x.element_size()


def device_table(values: list[int], device: torch.device) -> torch.Tensor:
    """A batch kernel's per-sequence int64 table on `device`: on CUDA through pinned memory,
    asynchronously, so the host never waits for the device here (the caching host allocator keeps
    the pinned block until the copy has run)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.int64)
    return torch.tensor(values, dtype=torch.int64, pin_memory=True).to(device, non_blocking=True)


def kernels_on(device: torch.device) -> bool:
    """Whether the decode path runs its Triton kernels on `device`'s tensors: on CUDA. Looked up
    through this module at each call, so that a test can turn it on for CPU tensors under Triton's
    interpreter (tests/test_decode_attention.py)."""
    return device.type == "cuda"
