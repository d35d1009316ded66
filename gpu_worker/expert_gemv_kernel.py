"""One quantized expert projection per row, dequantized in the kernel (hcs_hybrid decode's GPU share,
moe_gpu.moe_pairs):

    y[p, o] = sum over groups g of  s[rows[p], o, g] * sum over k in g of  q[rows[p], o, k] * x[p, k]

in float32, for INT4 (q = nibble - 8, two per byte, the low nibble first) and INT8 experts. A
decode step multiplies each chosen expert by one vector, so the work is reading the expert's bytes
once: dequantizing to bf16 first (dequant_kernel.py) writes and reads them again at four times the
size, and a layer's 8 experts took ~160 us that way on the lent H200 against the pool's turn.

A pair whose row is -1 (a choice the tensors do not hold: hcs_hybrid's cold ones) reads nothing and
gives zeros.

Many tokens a step (`expert_grouped`, from `GROUPED_MIN_PAIRS` pairs): the pairs, sorted by expert
on the device (`pair_groups`: no host sync, so the step stays a graph), are run expert by expert:
the program of an expert's first pair dequantizes a tile of its weights once into x's dtype and
multiplies it with the rows of all its pairs (up to BM a pass) in the tensor cores, float32 sums:

    Y[pairs of e, o] = X[pairs of e] @ W_e[o, :]^T      W_e = q * s rounded to x's dtype, as prefill's

A program per pair read each (token, choice) pair's expert: at 32 tokens of Qwen3-30B-A3B ~680 MB a
layer for ~300 MB of distinct experts (the L2 serves some repeats), ~555 us a layer on the H100
(device_check, 2026-12-05); an earlier grouping that ran an expert's pairs one after another in one
program read each expert once and was slower still (686 us), having no tensor-core product. The
grouped product's weights are rounded to x's dtype (bf16: 8 bits of mantissa for q * s's 11) where
the per-pair kernel multiplies in float32: the same rounding prefill's grouped matrix product has,
far below INT4's own.

The reference is dequant.py's dequant_reference followed by a float32 matrix-vector product
(tests/test_dequant.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..shared.expert_store import ExpertFormat

# Stored bytes of a row a program reads per loop step: a group at a time (16 bytes of INT4/g32)
# left each step too little to read to keep the memory busy (~675 GB/s for a layer's 8 experts on the
# H100, device_check 2026-12-05); 128 gives a [32 rows, 128 bytes] tile, two 16-byte loads a thread.
_STEP_BYTES = 128


@triton.jit
def _gemv_kernel(q_ptr, s_ptr, rows_ptr, x_ptr, y_ptr, O, K, QK, NG, GQ,
                 INT4: tl.constexpr, BO: tl.constexpr, BG: tl.constexpr, GP: tl.constexpr, X_DIV: tl.constexpr):
    # one program: BO output rows of pair p (input row p // X_DIV), over all K, GP groups (GQ stored
    # bytes each) a step
    p = tl.program_id(0)
    r = tl.load(rows_ptr + p)
    o = tl.program_id(1) * BO + tl.arange(0, BO)
    om = o < O
    j = tl.arange(0, BG)
    jm = j < GQ
    wrow = r.to(tl.int64) * O + o  # [BO] rows of the expert's weight
    ng = tl.where(r >= 0, NG, 0)  # row -1: a pair the tensors do not hold, whose output is zero
    acc = tl.zeros((BO,), tl.float32)
    xp = x_ptr + (p // X_DIV).to(tl.int64) * K
    for g0 in range(0, ng, GP):
        g = g0 + tl.arange(0, GP)
        gm = g < ng
        byte = g[:, None] * GQ + j[None, :]  # [GP, BG] of a row's stored bytes
        bm = gm[:, None] & jm[None, :]
        b = tl.load(q_ptr + wrow[:, None, None] * QK + byte[None, :, :], mask=om[:, None, None] & bm[None, :, :],
                    other=0).to(tl.int32)
        s = tl.load(s_ptr + wrow[:, None] * NG + g[None, :], mask=om[:, None] & gm[None, :], other=0.0).to(tl.float32)
        if INT4:
            xe = tl.load(xp + 2 * byte, mask=bm, other=0.0).to(tl.float32)
            xo = tl.load(xp + 2 * byte + 1, mask=bm, other=0.0).to(tl.float32)
            lo = ((b & 15) - 8).to(tl.float32)
            hi = ((b >> 4) - 8).to(tl.float32)
            part = tl.sum(lo * xe[None, :, :] + hi * xo[None, :, :], axis=2)
        else:
            xv = tl.load(xp + byte, mask=bm, other=0.0).to(tl.float32)
            part = tl.sum(b.to(tl.float32) * xv[None, :, :], axis=2)
        acc += tl.sum(part * s, axis=1)
    tl.store(y_ptr + p.to(tl.int64) * O + o, acc.to(y_ptr.dtype.element_ty), mask=om)


def expert_gemv(fmt: ExpertFormat, t: dict[str, torch.Tensor], name: str, rows: torch.Tensor, x: torch.Tensor,
                tiles: tuple[int, int, int] | None = None, x_div: int = 1,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Weights `name` of experts `rows` (int64 [P]) times x [P / x_div, K], pair p taking row
    p // x_div (a decode step's k choices of a token read its one row, not a gathered copy): [P, O]
    in `dtype` (summed in float32, rounded once), zero where a row is -1 (a choice these tensors do
    not hold). `tiles`: (output rows a program, stored bytes of a row a loop step, warps) instead of
    (32, _STEP_BYTES, 4) (benchmarks/device_check.py times a few)."""
    q, s = t[f"{name}.q"], t[f"{name}.s"]
    _, O, QK = q.shape
    NG = s.shape[-1]
    K = x.shape[1]
    y = torch.empty((rows.numel(), O), dtype=dtype, device=x.device)
    if y.numel():
        GQ = QK // NG
        BG = triton.next_power_of_2(GQ)
        BO, step, warps = tiles or (32, _STEP_BYTES, 4)
        _gemv_kernel[(rows.numel(), triton.cdiv(O, BO))](
            q, s, rows, x.contiguous(), y, O, K, QK, NG, GQ,
            INT4=fmt.kind == "int4", BO=BO, BG=BG, GP=max(1, step // BG), X_DIV=x_div, num_warps=warps,
        )
    return y


# Pairs a step from which expert_grouped replaces a program per pair (moe_gpu.pairs_in_kernels).
GROUPED_MIN_PAIRS = 32


def pair_groups(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rows int64 [P] -> (key: rows sorted, order: each sorted pair's index in rows, end: where its
    expert's run of pairs ends in key), all on the device, for expert_grouped (once per layer: the
    gate/up and the down products share it)."""
    key, order = torch.sort(rows)
    return key, order, torch.searchsorted(key, key, right=True)


@triton.jit
def _grouped_kernel(q_ptr, s_ptr, key_ptr, order_ptr, end_ptr, x_ptr, y_ptr, O, K, QK, NG, GQ,
                    INT4: tl.constexpr, BM: tl.constexpr, BO: tl.constexpr, BKB: tl.constexpr,
                    X_DIV: tl.constexpr):
    # one program: BO output rows of the expert whose run of sorted pairs starts at position p (the
    # programs of a run's other positions do nothing), over all K, BKB stored bytes a step, its
    # pairs BM at a time; the run of row -1 (pairs not held) writes zeros
    p = tl.program_id(0)
    r = tl.load(key_ptr + p)
    prev = tl.load(key_ptr + p - 1, mask=p > 0, other=-2)
    n = tl.where(prev != r, tl.load(end_ptr + p) - p, 0)
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
        pair = tl.load(order_ptr + p + m, mask=mm, other=0)
        xrow = x_ptr + (pair // X_DIV).to(tl.int64)[:, None] * K
        acc = tl.zeros((BM, BO), tl.float32)
        for k0 in range(0, kq, BKB):
            kb = k0 + jb
            bm = om[:, None] & (kb < QK)[None, :]
            b = tl.load(q_ptr + wrow[:, None] * QK + kb[None, :], mask=bm, other=0).to(tl.int32)
            s = tl.load(s_ptr + wrow[:, None] * NG + (kb // GQ)[None, :], mask=bm, other=0.0).to(tl.float32)
            if INT4:  # byte j: weights 2j (low nibble) and 2j + 1, interleaved back into one row
                w = tl.reshape(tl.join(((b & 15) - 8).to(tl.float32) * s, ((b >> 4) - 8).to(tl.float32) * s),
                               (BO, 2 * BKB))
            else:
                w = b.to(tl.float32) * s
            kx = PER * k0 + jx
            xv = tl.load(xrow + kx[None, :], mask=mm[:, None] & (kx < K)[None, :], other=0.0)
            acc = tl.dot(xv, tl.trans(w.to(xv.dtype)), acc)
        tl.store(y_ptr + pair.to(tl.int64)[:, None] * O + o[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=mm[:, None] & om[None, :])


def expert_grouped(fmt: ExpertFormat, t: dict[str, torch.Tensor], name: str,
                   groups: tuple[torch.Tensor, torch.Tensor, torch.Tensor], x: torch.Tensor,
                   tiles: tuple[int, int, int, int] | None = None, x_div: int = 1) -> torch.Tensor:
    """expert_gemv's product for pairs grouped by `pair_groups(rows)`, x [P / x_div, K] in a 16-bit
    float: [P, O] in x's dtype, pair p in row p, zero where its row is -1. `tiles`: (pairs a pass,
    output rows a program, stored bytes of a row a loop step, warps) instead of (16, 64, 64, 4)."""
    key, order, end = groups
    q, s = t[f"{name}.q"], t[f"{name}.s"]
    _, O, QK = q.shape
    NG = s.shape[-1]
    K = x.shape[1]
    y = torch.empty((key.numel(), O), dtype=x.dtype, device=x.device)
    if y.numel():
        BM, BO, BKB, warps = tiles or (16, 64, 64, 4)
        _grouped_kernel[(key.numel(), triton.cdiv(O, BO))](
            q, s, key, order, end, x.contiguous(), y, O, K, QK, NG, QK // NG,
            INT4=fmt.kind == "int4", BM=BM, BO=BO, BKB=BKB, X_DIV=x_div, num_warps=warps,
        )
    return y
