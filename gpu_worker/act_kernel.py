"""The Triton kernel of moe_gpu.masked_act for SiLU experts: the gate/up projection's output turned
into the down projection's input in one pass.

    a[r] = silu(g[r]) * u[r]   where keep[r], else 0          (gu[r] = [g[r]; u[r]], each I wide)

The torch reference (moe_gpu.masked_act_reference) is three elementwise kernels, SiLU, the product
and the mask, each reading and writing a [R, I] tensor: at a 4096-token chunk of Qwen3-30B-A3B
(R = 32,768 pairs, I = 768) they took ~60 us each on an H100, 25.6 ms of a 10K prefill step's 381
(BENCHMARKS.md, session 22). Here each program reads a row's g and u once and writes a once. The
SiLU is rounded to the output dtype before the product, as the reference's two kernels round it, so
the two differ only where the exponential's own rounding does. tests/test_act_kernel.py compares
them under Triton's interpreter."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # columns of a row per program


@triton.jit
def _silu_mul_kernel(GU, KEEP, A, I, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < I
    g = tl.load(GU + r * 2 * I + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(GU + r * 2 * I + I + cols, mask=ok, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(A.dtype.element_ty).to(tl.float32)
    a = s * u
    keep = tl.load(KEEP + r)
    tl.store(A + r * I + cols, tl.where(keep != 0, a, 0.0).to(A.dtype.element_ty), mask=ok)


def masked_silu_mul_triton(gu: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """gu [R, 2I], keep [R] (bool, or weights: rows where it is zero are zero) -> [R, I] in gu's dtype."""
    R, two_i = gu.shape
    a = torch.empty(R, two_i // 2, dtype=gu.dtype, device=gu.device)
    if R:
        _silu_mul_kernel[(R, triton.cdiv(two_i // 2, BLOCK))](gu.contiguous(), keep.contiguous(), a, two_i // 2,
                                                            BLOCK=BLOCK)
    return a
