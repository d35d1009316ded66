"""The Triton kernel behind layers.linear on CUDA for a decode step's few tokens: y = x W^T for x
[M, K] with M <= MAX_TOKENS and a 16-bit weight W [N, K] read once.

Why: a decode layer's attention products are matrix-vector products bound by reading the weight
(Qwen3-30B-A3B's qkv 5120 x 2048 and o 2048 x 4096: 38 MB of bf16 a layer, 11 us at the H100's
3.35 TB/s), and cuBLAS took 9.7 us for qkv and 8.2 + 1.7 for o, the second a split-K product and its
reduction kernel (session 24's trace): ~2.2 TB/s and a launch more, 48 times a token. Here a program
loads ELEMENTS weights at once, BN whole rows of W where they fit (every load in flight together,
no pipeline to fill), multiplies them with the token's x in float32 and sums each row: thousands of
small programs, all resident at once, so the reads are as deep as HBM wants, and no split of K, so
no reduction kernel. A first version (session 27, call 1) ran W x^T on the tensor cores, tiles
streamed through a software pipeline: 10-11 us a product in the decode step, slower than cuBLAS.
With a norm (layers.norm_linear: the input norm before qkv), each program normalises x as it
loads it, one launch of the turn fewer.

Arithmetic: products of 16-bit values are exact in float32; the sums are float32 in this kernel's
order (cuBLAS's order is its own and not fixed either), rounded once to x's dtype, as F.linear does.

CUDA graphs: no host syncs; the output is allocated from the input's shape.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .norm_rope_kernel import _inv_rms, _weighted

MAX_TOKENS = 4  # more tokens re-read W's rows from L2 per token; cuBLAS's matrix product takes them
# (ELEMENTS, WARPS): the weights a program loads at once (BN rows of BK, BK the row where it fits),
# and its warps
TILES = (8192, 4)
# Off unless KRASIS_GEMV=1: this version has not run on the device yet (session 27 ran out of device
# time; the first version, tensor-core tiles, was slower than cuBLAS in the decode step), and cuBLAS
# is what decode had. benchmarks/gpu_calls/turn2.sh measures it against cuBLAS.
ENABLED = os.environ.get("KRASIS_GEMV", "0") == "1"


@triton.jit(do_not_specialize=["M"])
def _gemv(X, W, Y, LN, eps, M, N, sx, sy, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr):
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    DT = X.dtype.element_ty
    for m in range(M):
        inv = 1.0
        if NORM:
            # the row normalised as norm_rope_kernel's rms_norm does it: its squares summed first (a
            # few KB from L2, in every program)
            sq = tl.zeros((BK,), dtype=tl.float32)
            for k0 in range(0, K, BK):
                k = k0 + tl.arange(0, BK)
                xk = tl.load(X + m * sx + k, mask=k < K, other=0.0).to(tl.float32)
                sq += xk * xk
            inv = _inv_rms(tl.sum(sq, 0), eps, K)
        acc = tl.zeros((BN, BK), dtype=tl.float32)
        for k0 in range(0, K, BK):
            k = k0 + tl.arange(0, BK)
            w = tl.load(W + n[:, None].to(tl.int64) * K + k[None, :], mask=(n < N)[:, None] & (k < K)[None, :], other=0.0)
            xk = tl.load(X + m * sx + k, mask=k < K, other=0.0)
            if NORM:
                xk = _weighted(xk.to(tl.float32), inv, tl.load(LN + k, mask=k < K, other=0.0), DT, DT)
            acc += w.to(tl.float32) * xk.to(tl.float32)[None, :]
        tl.store(Y + m * sy + n, tl.sum(acc, 1).to(Y.dtype.element_ty), mask=n < N)


def fits(x: torch.Tensor, w: torch.Tensor, norm: torch.Tensor | None = None) -> bool:
    """Whether gemv takes x [M, K] and w [N, K] (and the norm's weight [K])."""
    return (ENABLED and x.dim() == 2 and 0 < x.shape[0] <= MAX_TOKENS and x.stride(-1) == 1 and w.dim() == 2
            and w.shape[1] == x.shape[1] and w.is_contiguous() and w.dtype == x.dtype
            and x.dtype in (torch.bfloat16, torch.float16) and (norm is None or norm.shape == (x.shape[1],)
                                                                 and norm.dtype == x.dtype))


def gemv(x: torch.Tensor, w: torch.Tensor, tiles: tuple[int, int] = TILES,
         norm: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T -> [M, N] in x's dtype, where `fits`; with norm = (weight, eps),
    rms_norm(x, weight, eps) @ w^T, the norm computed in the product's kernel."""
    m, k = x.shape
    n = w.shape[0]
    elements, warps = tiles
    bk = min(elements, triton.next_power_of_2(k))
    bn = elements // bk
    ln, eps = norm if norm is not None else (x, 0.0)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _gemv[(triton.cdiv(n, bn),)](x, w, y, ln, eps, m, n, x.stride(0), y.stride(0), K=k, BN=bn, BK=bk,
                                 NORM=norm is not None, num_warps=warps,
                                 enable_fp_fusion=False)  # the norm's roundings are torch's (norm_rope_kernel)
    return y
