"""Quantized experts times the rows routed to them, grouped by expert and dequantized inside the
kernel: each expert's weight tiles are read once (from HBM) for all its rows and multiplied in the
tensor cores, float32 sums:

    Y[rows of e, o] = X[rows of e] @ W_e[o, :]^T        W_e = q * s, rounded to X's dtype

for INT4 (q = nibble - 8, two per byte, the low nibble first) and INT8 experts. The weights are
rounded to x's dtype as dequant.py's copy for torch's grouped product rounds them (bf16: 8 bits of
mantissa for q * s's 11, far below INT4's own error); expert_gemv_kernel.py's matrix-vector product
multiplies in float32 instead.

One tile product (`_rows_product`: BO output rows of one expert against its rows BM at a time),
two schedules:

- decode (`expert_grouped`, a step's (token, choice) pairs sorted by `pair_groups` on the device, so
  the step stays a CUDA graph): a program per sorted position, the first position of an expert's
  run doing the work. A program per pair (expert_gemv) reads each pair's expert: at 32 tokens of
  Qwen3-30B-A3B ~680 MB a layer for ~300 MB of distinct experts, ~555 us a layer on the H100
  (device_check, 2026-12-05); an earlier grouping that ran an expert's pairs one after another in
  one program, with no tensor-core product, read each expert once and was slower still (686 us).
- prefill (`expert_gemm`, a chunk's rows already sorted into groups by moe_gpu): a program per tile
  of BM rows of one group, found from the groups' cumulative tile counts. It replaces dequantizing
  every expert of a layer into bf16 (dequant.py: ~2.7x the stored bytes written, then read again by
  torch's grouped product: a 10K prefill's 40 ms of dequantization in session 22's profile) and
  gathers each row's input itself instead of a copy of x in sorted order.

The reference is dequant.py's dequant_reference rounded to x's dtype, times x in float32
(tests/test_dequant.py, under Triton's interpreter in float16: its bfloat16 dot is wrong).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..shared.expert_store import ExpertFormat
from .dequant_kernel import int4_pair

# Pairs a decode step from which moe_gpu.pairs_in_kernels groups them (expert_grouped) instead of a
# program per pair (expert_gemv). A Qwen3-30B-A3B layer's w13 + w2 on the H100 (device_check,
# session 26), a program per pair against grouped, us: 1 token 17.0 / 30.5, 4 tokens 54.8 / 76.0,
# 16 tokens 185.7 / 179.9, 32 tokens 368.3 / 249.4; with half the pairs not held (hcs_hybrid's cold
# ones) 16 tokens 106.1 / 123.9 and 32 tokens 198.7 / 204.5. From 32 tokens of 8 choices, then.
GROUPED_MIN_PAIRS = 256

# (rows a pass, output rows a program, stored bytes of a row a loop step, warps, pipeline stages).
# Prefill's, a 4096-token chunk of that layer on the H100 (session 28, device_check): 1,277 us (242
# TFLOP/s) against 1,458 for (128, 128, 64, 8, 3) (session 26's choice, 1,456 then), 1,434 with 4
# stages, 1,510 for (64, 128, 32, 4, 3), 1,847 for (128, 256, 64, 8, 3), and 1,640 for dequantizing
# every expert into bf16 and torch's grouped product; the same bits as that product in every
# tiling. At the bench, a one-chunk 4,000-token prompt: 31,082 tok/s against 28,928 with the old
# tile (session 28, call 4). A layer dequantized once for a step's several chunks
# (prefill_strategies: dequant_once) still goes to torch's product, which then reads bf16 with no
# dequantization per chunk (825 us a layer for the product alone, session 28).
DECODE_TILES = (16, 64, 64, 4, 3)
PREFILL_TILES = (256, 128, 64, 8, 3)


@triton.jit
def _rows_product(q_ptr, s_ptr, idx_ptr, x_ptr, y_ptr, r, i0, n, O, K, QK, NG, GQ,
                  INT4: tl.constexpr, BM: tl.constexpr, BO: tl.constexpr, BKB: tl.constexpr,
                  SPLIT_GROUPS: tl.constexpr, X_DIV: tl.constexpr, GATHER: tl.constexpr, SCATTER: tl.constexpr):
    # sorted rows i0 .. i0 + n - 1, BM a pass, times the output rows of program_id(1)'s tile of
    # expert row r's weights (r < 0: the rows get zeros). Row i's input is x[idx[i] // X_DIV]
    # (GATHER) or x[i]; its output goes to y[idx[i]] (SCATTER) or y[i].
    kq = tl.where(r >= 0, QK, 0)
    o = tl.program_id(1) * BO + tl.arange(0, BO)
    om = o < O
    wrow = r.to(tl.int64) * O + o
    PER: tl.constexpr = 2 if INT4 else 1  # weights a stored byte holds
    jb = tl.arange(0, BKB)
    jx = tl.arange(0, PER * BKB)
    for m0 in range(0, n, BM):
        m = m0 + tl.arange(0, BM)
        mm = m < n
        i = (i0 + m).to(tl.int64)
        src = i
        dst = i
        if GATHER or SCATTER:
            pair = tl.load(idx_ptr + i, mask=mm, other=0).to(tl.int64)
            if GATHER:
                src = pair // X_DIV
            if SCATTER:
                dst = pair
        xrow = x_ptr + src[:, None] * K
        acc = tl.zeros((BO, BM), tl.float32)
        for k0 in range(0, kq, BKB):
            kb = k0 + jb
            bm = om[:, None] & (kb < QK)[None, :]
            b = tl.load(q_ptr + wrow[:, None] * QK + kb[None, :], mask=bm, other=0).to(tl.int32)
            if SPLIT_GROUPS:  # whole groups a step: a scale per (row, group), broadcast over its bytes
                NS: tl.constexpr = BKB // SPLIT_GROUPS
                g = k0 // SPLIT_GROUPS + tl.arange(0, NS)
                s = tl.load(s_ptr + wrow[:, None] * NG + g[None, :], mask=om[:, None] & (g < NG)[None, :], other=0.0)
                s = tl.reshape(tl.broadcast_to(s.to(tl.float32)[:, :, None], (BO, NS, SPLIT_GROUPS)), (BO, BKB))
            else:  # a group of bytes not a power of two: each byte's scale gathered
                s = tl.load(s_ptr + wrow[:, None] * NG + (kb // GQ)[None, :], mask=bm, other=0.0).to(tl.float32)
            if INT4:  # byte j: weights 2j (low nibble) and 2j + 1, interleaved back into one row
                lo, hi = int4_pair(b)
                w = tl.reshape(tl.join(lo * s, hi * s), (BO, 2 * BKB))
            else:
                w = b.to(tl.float32) * s
            kx = PER * k0 + jx
            xv = tl.load(xrow + kx[None, :], mask=mm[:, None] & (kx < K)[None, :], other=0.0)
            # W x^T rather than x W^T: the weights, dequantized in registers, are the product's first
            # operand (Hopper's wgmma reads that one from registers and needs 64 of its rows, which
            # a decode step's BM = 16 rows of x are not)
            acc = tl.dot(w.to(xv.dtype), tl.trans(xv), acc)
        tl.store(y_ptr + dst[None, :] * O + o[:, None], acc.to(y_ptr.dtype.element_ty), mask=om[:, None] & mm[None, :])


@triton.jit
def _pairs_kernel(q_ptr, s_ptr, key_ptr, order_ptr, end_ptr, x_ptr, y_ptr, O, K, QK, NG, GQ,
                  INT4: tl.constexpr, BM: tl.constexpr, BO: tl.constexpr, BKB: tl.constexpr,
                  SPLIT_GROUPS: tl.constexpr, X_DIV: tl.constexpr):
    # decode: the program of sorted position p works if p starts its expert's run (the run of row
    # -1, pairs not held, writes zeros); the others return at once
    p = tl.program_id(0)
    r = tl.load(key_ptr + p)
    prev = tl.load(key_ptr + p - 1, mask=p > 0, other=-2)
    n = tl.where(prev != r, tl.load(end_ptr + p) - p, 0)
    _rows_product(q_ptr, s_ptr, order_ptr, x_ptr, y_ptr, r, p, n, O, K, QK, NG, GQ,
                  INT4, BM, BO, BKB, SPLIT_GROUPS, X_DIV, True, True)


@triton.jit
def _tiles_kernel(q_ptr, s_ptr, ends_ptr, tiles_ptr, experts_ptr, idx_ptr, x_ptr, y_ptr, G, O, K, QK, NG, GQ,
                  INT4: tl.constexpr, BM: tl.constexpr, BO: tl.constexpr, BKB: tl.constexpr,
                  SPLIT_GROUPS: tl.constexpr, LOG_G: tl.constexpr, HAS_EXPERTS: tl.constexpr,
                  GATHER: tl.constexpr):
    # prefill: tile t is BM rows of group g, the first group whose cumulative tile count exceeds t
    # (a binary search over the G groups; tiles past the last group do nothing)
    t = tl.program_id(0)
    lo = 0
    hi = G
    for _ in tl.static_range(LOG_G):
        mid = (lo + hi) // 2
        left = tl.load(tiles_ptr + mid, mask=mid < G, other=0) > t
        go = lo < hi
        hi = tl.where(go & left, mid, hi)
        lo = tl.where(go & ~left, mid + 1, lo)
    g = lo
    real = g < G
    first = tl.load(ends_ptr + g - 1, mask=real & (g > 0), other=0)
    before = tl.load(tiles_ptr + g - 1, mask=real & (g > 0), other=0)
    i0 = first + (t - before) * BM
    n = tl.where(real, tl.minimum(tl.load(ends_ptr + g, mask=real, other=0) - i0, BM), 0)
    if HAS_EXPERTS:
        r = tl.load(experts_ptr + g, mask=real, other=-1)
    else:
        r = tl.where(real, g, -1)
    _rows_product(q_ptr, s_ptr, idx_ptr, x_ptr, y_ptr, r, i0, n, O, K, QK, NG, GQ,
                  INT4, BM, BO, BKB, SPLIT_GROUPS, 1, GATHER, False)


def _shape(fmt: ExpertFormat, t: dict[str, torch.Tensor], name: str, x: torch.Tensor, bkb: int):
    """(q, s, O, K, QK, NG, GQ, SPLIT_GROUPS): SPLIT_GROUPS is a group's stored bytes where a loop
    step of `bkb` bytes holds whole groups of a power-of-two size, else 0 (scales gathered a byte)."""
    q, s = t[f"{name}.q"], t[f"{name}.s"]
    _, O, QK = q.shape
    NG = s.shape[-1]
    GQ = QK // NG
    split = GQ if GQ & (GQ - 1) == 0 and bkb % GQ == 0 else 0
    return q, s, O, x.shape[1], QK, NG, GQ, split


def pair_groups(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rows int64 [P] -> (key: rows sorted, order: each sorted pair's index in rows, end: where its
    expert's run of pairs ends in key), all on the device, for expert_grouped (once per layer: the
    gate/up and the down products share it)."""
    key, order = torch.sort(rows)
    return key, order, torch.searchsorted(key, key, right=True)


def expert_grouped(fmt: ExpertFormat, t: dict[str, torch.Tensor], name: str,
                   groups: tuple[torch.Tensor, torch.Tensor, torch.Tensor], x: torch.Tensor,
                   tiles: tuple[int, ...] | None = None, x_div: int = 1) -> torch.Tensor:
    """A decode step's weights `name` of the pairs' experts times x [P / x_div, K] (pair p reading
    row p // x_div), the pairs grouped by `pair_groups(rows)`, x in a 16-bit float: [P, O] in x's
    dtype, pair p in row p, zero where its row is -1. `tiles`: DECODE_TILES's fields."""
    key, order, end = groups
    BM, BO, BKB, warps, stages = tiles or DECODE_TILES
    q, s, O, K, QK, NG, GQ, split = _shape(fmt, t, name, x, BKB)
    y = torch.empty((key.numel(), O), dtype=x.dtype, device=x.device)
    if y.numel():
        _pairs_kernel[(key.numel(), triton.cdiv(O, BO))](
            q, s, key, order, end, x.contiguous(), y, O, K, QK, NG, GQ, INT4=fmt.kind == "int4", BM=BM, BO=BO,
            BKB=BKB, SPLIT_GROUPS=split, X_DIV=x_div, num_warps=warps, num_stages=stages,
        )
    return y


def expert_gemm(fmt: ExpertFormat, t: dict[str, torch.Tensor], name: str, x: torch.Tensor, idx: torch.Tensor | None,
                counts: torch.Tensor, experts: torch.Tensor | None = None,
                tiles: tuple[int, ...] | None = None) -> torch.Tensor:
    """A prompt chunk's rows, sorted into groups of `counts` [G] rows (on the device), times the
    weights `name` of each group's expert (row `experts[g]` of t; None: row g): [R, O] in x's dtype,
    in the sorted order. Row i's input is x[idx[i]] (None: x is in sorted order, R rows). x in a
    16-bit float. `tiles`: PREFILL_TILES's fields."""
    BM, BO, BKB, warps, stages = tiles or PREFILL_TILES
    q, s, O, K, QK, NG, GQ, split = _shape(fmt, t, name, x, BKB)
    R = x.shape[0] if idx is None else idx.numel()
    G = counts.numel()
    y = torch.empty((R, O), dtype=x.dtype, device=x.device)
    if R and G:
        ends = torch.cumsum(counts, 0)
        tile_ends = torch.cumsum((counts + BM - 1) // BM, 0)
        _tiles_kernel[(triton.cdiv(R, BM) + G, triton.cdiv(O, BO))](
            q, s, ends, tile_ends, experts if experts is not None else ends, idx if idx is not None else ends,
            x.contiguous(), y, G, O, K, QK, NG, GQ, INT4=fmt.kind == "int4", BM=BM, BO=BO, BKB=BKB,
            SPLIT_GROUPS=split, LOG_G=max(1, G.bit_length()), HAS_EXPERTS=experts is not None,
            GATHER=idx is not None, num_warps=warps, num_stages=stages,
        )
    return y
