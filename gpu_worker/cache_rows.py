"""How the KV cache hands out what it stores (kv_cache.py), and how a kernel that serves several
sequences' caches in one launch finds them. Its own module because both decode attention
(decode_attention.py) and the Triton kernels (decode_attention_kernel.py, fp8_kernel.py), which the
others import, read it: none may import another for it."""

from __future__ import annotations

from typing import NamedTuple, Sequence

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


# Where rows may start, in elements from their anchor: the batch kernels are told so (tl.multiple_of)
# and read 16 bytes a load. Every allocation meets it (torch's CUDA blocks are 512-byte aligned, its
# CPU ones 64), and so does a view that starts at a multiple of 16 columns.
ALIGN = 16

_ANCHORS: dict[tuple, torch.Tensor] = {}
_ANCHOR_PTRS: dict[tuple, tuple[int, int]] = {}  # (dtype, device) as tensors carry them -> (address, element size)


def anchor(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A one-element tensor kept for the process's life: the base pointer from which a batch kernel
    finds every sequence's cache rows of that dtype (element_gap). It never moves, so a kernel
    captured in a CUDA graph can take it once and read each step's offsets from a device table."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:N" must find one anchor
        device = torch.device("cuda", torch.cuda.current_device())
    key = (dtype, device)
    if key not in _ANCHORS:
        _ANCHORS[key] = torch.empty(1, dtype=dtype, device=device)
    return _ANCHORS[key]


def element_gap(x: torch.Tensor) -> int:
    """Where x starts, in elements from its dtype's anchor (a batch kernel adds it to the anchor's
    pointer: each sequence's cache is its own allocation, all in one address space); a multiple of
    ALIGN."""
    key = (x.dtype, x.device)
    if key not in _ANCHOR_PTRS:  # a step's table takes thousands of these: the anchor's address once
        a = anchor(*key)
        _ANCHOR_PTRS[key] = (a.data_ptr(), a.element_size())
    base, size = _ANCHOR_PTRS[key]
    gap = x.data_ptr() - base
    if gap % (size * ALIGN):
        raise ValueError(f"cached rows must start {ALIGN} elements apart from their dtype's anchor (a view must start at a multiple of {ALIGN} columns)")
    return gap // size


def offsets(parts: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor | None]]], starts: Sequence[int]) -> list[int]:
    """The batch kernels' table of one layer: for each sequence, two int64 per stored part (the
    element offsets of its values and of its scales, 0 where it has none: element_gap; `parts`
    holds each sequence's (values, scales) from their first row) and then the position of its
    first new row. Its width per sequence is 2 x parts + 1."""
    return table_rows([part_gaps(stored) for stored in parts], starts)


def table_rows(gaps: Sequence[list[int]], starts: Sequence[int]) -> list[int]:
    """offsets() from each sequence's part_gaps (which a cache keeps while its buffers do)."""
    table = []
    for g, st in zip(gaps, starts):
        table += g
        table.append(st)
    return table


def part_gaps(stored: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> list[int]:
    """One sequence's entries of offsets() but its position: its parts' values and scales gaps."""
    return [g for values, scales in stored for g in (element_gap(values), 0 if scales is None else element_gap(scales))]


def host_table(values: list[int]) -> torch.Tensor:
    """A batch kernel's int64 table on the host, pinned where CUDA is: copied to the device
    asynchronously, so the host never waits for the device (the caching host allocator keeps the
    pinned block until the copy has run)."""
    return torch.tensor(values, dtype=torch.int64, pin_memory=torch.cuda.is_available())


def device_table(values: list[int], device: torch.device) -> torch.Tensor:
    """host_table, on `device`."""
    table = host_table(values)
    return table.to(device, non_blocking=True) if device.type == "cuda" else table


def kernels_on(device: torch.device) -> bool:
    """Whether the decode path runs its Triton kernels on `device`'s tensors: on CUDA. Looked up
    through this module at each call, so that a test can turn it on for CPU tensors under Triton's
    interpreter (tests/test_decode_attention.py)."""
    return device.type == "cuda"
