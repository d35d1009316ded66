"""The Triton kernel of moe_gpu.pair_rows: a decode step's (token, choice) pairs located in the
tensors that hold the experts, and weighed, in one launch.

    rows[p] = lookup[ids[p]]  (-1: not held, as for ids[p] < 0)      wt[p] = w[p] where rows[p] >= 0, else 0

The torch reference (moe_gpu.pair_rows_reference) is a gather, a comparison and a select: three of the
six element-wise kernels (~1-2 us each) that session 29's trace found around a resident layer's ~74
us of decode kernels on the H100. tests/test_combine_kernel.py compares the two under Triton's
interpreter."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 256  # pairs per program: a decode step's 32 tokens of Qwen3's top-8 in one


@triton.jit
def _pair_rows_kernel(IDS, LOOKUP, W, ROWS, WT, P, BLOCK: tl.constexpr):
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = p < P
    e = tl.load(IDS + p, mask=ok, other=-1)
    r = tl.load(LOOKUP + e, mask=ok & (e >= 0), other=-1)
    w = tl.load(W + p, mask=ok, other=0.0).to(tl.float32)
    tl.store(ROWS + p, r, mask=ok)
    tl.store(WT + p, tl.where(r >= 0, w, 0.0), mask=ok)


def pair_rows_triton(lookup: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ids, weights = ids.reshape(-1).contiguous(), weights.reshape(-1).contiguous()
    rows = torch.empty(ids.shape, dtype=lookup.dtype, device=ids.device)
    wt = torch.empty(ids.shape, dtype=torch.float32, device=ids.device)
    if ids.numel():
        _pair_rows_kernel[(triton.cdiv(ids.numel(), BLOCK),)](ids, lookup, weights, rows, wt, ids.numel(), BLOCK=BLOCK)
    return rows, wt
