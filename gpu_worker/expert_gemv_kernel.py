"""One quantized expert projection per row, dequantized in the kernel (hcs_hybrid decode's GPU share,
moe_gpu.moe_pairs):

    y[p, o] = sum over groups g of  s[rows[p], o, g] * sum over k in g of  q[rows[p], o, k] * x[p, k]

in float32, for INT4 (q = nibble - 8, two per byte, the low nibble first) and INT8 experts. A
decode step multiplies each chosen expert by one vector, so the work is reading the expert's bytes
once: dequantizing to bf16 first (dequant_kernel.py) writes and reads them again at four times the
size, and a layer's 8 experts took ~160 us that way on the lent H200 against the pool's turn.

A pair whose row is -1 (a choice the tensors do not hold: hcs_hybrid's cold ones) reads nothing and
gives zeros.

Many tokens a step group their pairs by expert instead (expert_grouped_kernel.py: each expert read
once, from its GROUPED_MIN_PAIRS pairs).

The reference is dequant.py's dequant_reference followed by a float32 matrix-vector product
(tests/test_dequant.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..shared.expert_store import ExpertFormat
from .dequant_kernel import int4_pair

# Stored bytes of a row a program reads per loop step: a group at a time (16 bytes of INT4/g32)
# left each step too little to read to keep the memory busy (~675 GB/s for a layer's 8 experts on the
# H100, device_check 2026-12-05); 128 gives a [32 rows, 128 bytes] tile, two 16-byte loads a thread.
# Whole rows a step (a program's loads issued at once) were slower: a layer's w13 and w2 for one
# token, each call on its own experts, 21.1 us at this tiling against 24.6-39.9 at (8-16 rows, 512-1024
# bytes) (device_check's pairs_cold, H100, session 29).
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
            lo, hi = int4_pair(b)
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
