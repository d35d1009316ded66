"""The Triton kernel of moe_gpu.combine_pairs: a prompt chunk's expert outputs, computed in expert
order, summed back into their tokens in one pass.

    out[t] += sum_j w[t, j] * y[inv[t, j]]        (j over the token's k choices, in order, float32)

y [P, H] holds the pairs' outputs sorted by expert; inv [P] is where pair (t, j) sits in that order,
w [P] its routing weight in token order. A decode step's pairs (moe_gpu.moe_pairs) are in token
order already (no inv), and its sum is the layer's whole routed output (`out` written, not added
to), or, for a layer whose experts are all on the device, that output added to the residual stream:

    out[t] = residual[t] + round(sum_j w[t, j] * y[t, j])      (out and residual in 16 bits)

rounded as the two torch kernels it replaces round it (`residual + sum.to(dtype)`, as the pool's
wait adds its layers: pool_client.collect), which with the float32 sum written and read between
them were 2-3 us of a resident layer's decode on the H100.

The torch reference (moe_gpu.combine_pairs_reference) gathers y into token order, widens it to
float32, weighs and sums it: five passes over a [P, H] tensor (P = 8 x the chunk's tokens for
Qwen3-30B-A3B: ~0.3 GB in bf16 and 0.65 GB in float32 at 10K tokens, ~1.3 ms of HBM time per layer
on an H200). Here each program reads its token's k rows once and writes its output once.
tests/test_combine_kernel.py compares the two under Triton's interpreter; device_check.py compiled."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # columns of the hidden state per program


@triton.jit
def _combine_kernel(Y, INV, W, OUT, RES, H, K: tl.constexpr, BLOCK: tl.constexpr, IN_ORDER: tl.constexpr,
                    ADD: tl.constexpr, RESIDUAL: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < H
    acc = tl.zeros([BLOCK], tl.float32)
    for j in tl.static_range(K):
        if IN_ORDER:
            r = t * K + j
        else:
            r = tl.load(INV + t * K + j).to(tl.int64)
        w = tl.load(W + t * K + j)
        acc += w * tl.load(Y + r * H + cols, mask=ok, other=0.0).to(tl.float32)
    o = OUT + t * H + cols
    if ADD:
        acc = tl.load(o, mask=ok, other=0.0) + acc
    if RESIDUAL:
        acc = tl.load(RES + t * H + cols, mask=ok, other=0.0).to(tl.float32) + acc.to(OUT.dtype.element_ty).to(tl.float32)
    tl.store(o, acc.to(OUT.dtype.element_ty), mask=ok)


def combine_pairs_triton(y: torch.Tensor, inv: torch.Tensor | None, w: torch.Tensor, out: torch.Tensor,
                         add: bool = True, residual: torch.Tensor | None = None) -> None:
    T, H = out.shape
    if T == 0:
        return
    k = w.numel() // T
    res = out if residual is None else residual.contiguous()
    _combine_kernel[(T, triton.cdiv(H, BLOCK))](y.contiguous(), w if inv is None else inv.contiguous(), w.contiguous(),
                                                out, res, H, K=k, BLOCK=BLOCK, IN_ORDER=inv is None, ADD=add and residual is None,
                                                RESIDUAL=residual is not None)
