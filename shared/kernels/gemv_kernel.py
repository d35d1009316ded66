"""The Triton kernel behind layers.linear on CUDA for a decode step's few tokens: y = x W^T for x
[M, K] with M <= MAX_TOKENS (INT8_MAX_TOKENS) and a weight W [N, K] read once: 16-bit, or INT8
rows with one scale each (--attn-bits 8: shared/quant.py's QuantLinear).

Why: a decode layer's attention products are matrix-vector products bound by reading the weight
(Qwen3-30B-A3B's qkv 5120 x 2048 and o 2048 x 4096: 38 MB of bf16 a layer, 11 us at the H100's
3.35 TB/s), and cuBLAS took 9.7 us for qkv and 8.2 + 1.7 for o, the second a split-K product and its
reduction kernel (session 24's trace): ~2.2 TB/s and a launch more, 48 times a token. Here a program
loads its rows of W whole (`tiles`: one 16-bit row, or 8192 INT8 weights; every load in
flight together, no pipeline to fill), multiplies them with the token's x in float32 and sums each
row: thousands of small programs, all resident at once, so the reads are as deep as HBM wants, and
no split of K, so no reduction kernel. A first version (session 27, call 1) ran W x^T on the tensor cores, tiles
streamed through a software pipeline: 10-11 us a product in the decode step, slower than cuBLAS.
With a norm (layers.norm_linear: the input norm before qkv), each program normalises x as it
loads it, one launch of the turn fewer.

INT8 rows: the reference path (QuantLinear.matmul_t) dequantizes the whole weight at every call
and multiplies the copy, 80-100 us a product on an H100 (2.7 ms for the LM head) where this kernel
takes 8-13. Each weight is dequantized in registers as the reference does it, q * scale in float32
rounded to x's dtype, so the kernel multiplies the same 16-bit weights that F.linear does on the
copy. Half the bytes of bf16 gain little at one token (qkv 8.9 against 9.3 us): latency bounds
these products there, not HBM.

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

MAX_TOKENS = 1  # 16-bit weights; more tokens: cuBLAS (see ENABLED)
# INT8 rows: their other way (a dequantized copy each call) is 6-10x slower up to 4 tokens (ENABLED)
INT8_MAX_TOKENS = 4
# The widest row a program loads whole (elements); wider rows are read in blocks of it
ROW_MAX = 16384
# 16-bit weights take it unless KRASIS_GEMV=0: a row a program, one token, beat cuBLAS for qkv, o and
# the LM head with each weight cold (9.0-9.3 / 7.7-7.9 / 197 us against 10.0 / 10.1 / 217; session
# 28, two H100 hosts), and the GPU's turn between two pool layers fell 58.5 -> 55.3 us. At 2 and 4
# tokens cuBLAS is faster (10.0 against 10.5 and 12.8 for qkv), hence MAX_TOKENS 1.
# INT8 rows always take it: their other way, a dequantized copy at every call, took 80-100 us a
# product (against 8-13 here, up to 4 tokens).
ENABLED = os.environ.get("KRASIS_GEMV", "1") == "1"


def tiles(k: int, int8: bool = False) -> tuple[int, int]:
    """(elements, warps) of a program for rows of k weights. 16-bit: one whole row (up to ROW_MAX),
    a warp per 1024 weights (2 to 8); INT8: at least 8192 weights (several short rows), a warp per
    2048. Timed on H100s with each weight cold (session 28, device_check's turn check): a 16-bit row
    a program was the fastest of six tilings for qkv (k 2048: 9.0-9.3 us against cuBLAS's 10.0) and
    the LM head, within 3% of it for o (k 4096); INT8's (8192, 4) the fastest of four for qkv and o
    (9.0 and 8.1 us: latency, not bytes, bounds these products at one token)."""
    elements = min(ROW_MAX, max(8192 if int8 else 0, triton.next_power_of_2(k)))
    return elements, max(2, min(8, elements // (2048 if int8 else 1024)))


@triton.jit
def _weights(W, S, n, k, N, K: tl.constexpr, DT: tl.constexpr, SCALED: tl.constexpr):
    """Rows n, columns k of W as float32: INT8 ones times their scales, rounded to DT first as
    quant.dequantize_q then the cast to x's dtype do."""
    w = tl.load(W + n[:, None].to(tl.int64) * K + k[None, :], mask=(n < N)[:, None] & (k < K)[None, :], other=0)
    if SCALED:
        w = (w.to(tl.float32) * tl.load(S + n, mask=n < N, other=0.0).to(tl.float32)[:, None]).to(DT)
    return w.to(tl.float32)


@triton.jit
def _input(X, LN, k, inv, K: tl.constexpr, DT: tl.constexpr, NORM: tl.constexpr):
    """x's columns k as float32, normalised (scale `inv`, the norm's weight LN) where NORM, with
    norm_rope_kernel's rms_norm roundings."""
    xk = tl.load(X + k, mask=k < K, other=0.0).to(tl.float32)
    if NORM:
        xk = _weighted(xk, inv, tl.load(LN + k, mask=k < K, other=0.0), DT, DT)
    return xk.to(tl.float32)


@triton.jit(do_not_specialize=["M"])
def _gemv(X, W, S, Y, LN, eps, M, N, sx, sy, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
          NORM: tl.constexpr, SCALED: tl.constexpr):
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    DT = X.dtype.element_ty
    if K <= BK:
        # the program's rows whole: loaded first, so that HBM's latency passes while the norm's
        # statistics are taken, and once for every token (the loop below reads them again per token)
        k = tl.arange(0, BK)
        w = _weights(W, S, n, k, N, K, DT, SCALED)
        for m in range(M):
            inv = 1.0
            if NORM:
                xf = tl.load(X + m * sx + k, mask=k < K, other=0.0).to(tl.float32)
                inv = _inv_rms(tl.sum(xf * xf, 0), eps, K)
            y = tl.sum(w * _input(X + m * sx, LN, k, inv, K, DT, NORM)[None, :], 1)
            tl.store(Y + m * sy + n, y.to(Y.dtype.element_ty), mask=n < N)
    else:
        for m in range(M):
            inv = 1.0
            if NORM:
                # the squares summed first (a few KB from L2, in every program)
                sq = tl.zeros((BK,), dtype=tl.float32)
                for k0 in range(0, K, BK):
                    k = k0 + tl.arange(0, BK)
                    xk = tl.load(X + m * sx + k, mask=k < K, other=0.0).to(tl.float32)
                    sq += xk * xk
                inv = _inv_rms(tl.sum(sq, 0), eps, K)
            acc = tl.zeros((BN, BK), dtype=tl.float32)
            for k0 in range(0, K, BK):
                k = k0 + tl.arange(0, BK)
                acc += _weights(W, S, n, k, N, K, DT, SCALED) * _input(X + m * sx, LN, k, inv, K, DT, NORM)[None, :]
            tl.store(Y + m * sy + n, tl.sum(acc, 1).to(Y.dtype.element_ty), mask=n < N)


def fits(x: torch.Tensor, w: torch.Tensor, norm: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> bool:
    """Whether gemv takes x [M, K] and w [N, K] (and the norm's weight [K]): w of x's dtype, or INT8
    with scale [N, 1] (QuantLinear's)."""
    if scale is None:
        weight_ok, most = ENABLED and w.dtype == x.dtype, MAX_TOKENS
    else:
        weight_ok = w.dtype == torch.int8 and scale.shape == (w.shape[0], 1) and scale.is_contiguous()
        most = INT8_MAX_TOKENS
    return (weight_ok and x.dim() == 2 and 0 < x.shape[0] <= most and x.stride(-1) == 1 and w.dim() == 2
            and w.shape[1] == x.shape[1] and w.is_contiguous()
            and x.dtype in (torch.bfloat16, torch.float16) and (norm is None or norm.shape == (x.shape[1],)
                                                                 and norm.dtype == x.dtype))


def gemv(x: torch.Tensor, w: torch.Tensor, tiling: tuple[int, int] | None = None,
         norm: tuple[torch.Tensor, float] | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T -> [M, N] in x's dtype, where `fits`; with norm = (weight, eps),
    rms_norm(x, weight, eps) @ w^T, the norm computed in the product's kernel; with scale [N, 1],
    w's INT8 rows times their scales (quant.dequantize_q) in x's dtype. `tiling`: (elements, warps)
    instead of tiles(k, INT8?)'s (device_check times several)."""
    m, k = x.shape
    n = w.shape[0]
    elements, warps = tiling or tiles(k, scale is not None)
    bk = min(elements, triton.next_power_of_2(k))
    bn = elements // bk
    ln, eps = norm if norm is not None else (x, 0.0)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _gemv[(triton.cdiv(n, bn),)](x, w, w if scale is None else scale, y, ln, eps, m, n, x.stride(0), y.stride(0),
                                 K=k, BN=bn, BK=bk, NORM=norm is not None, SCALED=scale is not None, num_warps=warps,
                                 enable_fp_fusion=False)  # the norm's roundings are torch's (norm_rope_kernel)
    return y
