"""One quantized expert projection per row, dequantized in the kernel (hcs_hybrid decode's GPU share,
moe_gpu.moe_pairs):

    y[p, o] = sum over groups g of  s[rows[p], o, g] * sum over k in g of  q[rows[p], o, k] * x[p, k]

in float32, for INT4 (q = nibble - 8, two per byte, the low nibble first) and INT8 experts. A
decode step multiplies each chosen expert by one vector, so the work is reading the expert's bytes
once: dequantizing to bf16 first (dequant_kernel.py) writes and reads them again at four times the
size, and a layer's 8 experts took ~160 us that way on the lent H200 against the pool's turn.

A pair whose row is -1 (a choice the tensors do not hold: hcs_hybrid's cold ones) reads nothing and
gives zeros. Pairs of one expert are not gathered into one program: on the H100 that read each
expert once but ran its pairs one after another, and was slower at every step size than a program
per pair, whose repeated reads of an expert the 50 MB L2 serves (device_check, 2026-12-05: 32
tokens, a Qwen3-30B-A3B layer's w13 and w2, 686 against 555 us).

The reference is dequant.py's dequant_reference followed by a float32 matrix-vector product
(tests/test_dequant.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..shared.expert_store import ExpertFormat


@triton.jit
def _gemv_kernel(q_ptr, s_ptr, rows_ptr, x_ptr, y_ptr, O, K, QK, NG, GQ,
                 INT4: tl.constexpr, BO: tl.constexpr, BG: tl.constexpr):
    # one program: BO output rows of pair p, over all K in groups (GQ stored bytes each)
    p = tl.program_id(0)
    r = tl.load(rows_ptr + p)
    o = tl.program_id(1) * BO + tl.arange(0, BO)
    om = o < O
    j = tl.arange(0, BG)
    jm = j < GQ
    wrow = r.to(tl.int64) * O + o  # [BO] rows of the expert's weight
    m = om[:, None] & jm[None, :]
    ng = tl.where(r >= 0, NG, 0)  # row -1: a pair the tensors do not hold, whose output is zero
    acc = tl.zeros((BO,), tl.float32)
    xp = x_ptr + p.to(tl.int64) * K
    for g in range(0, ng):
        b = tl.load(q_ptr + wrow[:, None] * QK + g * GQ + j[None, :], mask=m, other=0).to(tl.int32)
        s = tl.load(s_ptr + wrow * NG + g, mask=om, other=0.0).to(tl.float32)
        if INT4:
            k = 2 * (g * GQ + j)
            xe = tl.load(xp + k, mask=jm, other=0.0).to(tl.float32)
            xo = tl.load(xp + k + 1, mask=jm, other=0.0).to(tl.float32)
            lo = ((b & 15) - 8).to(tl.float32)
            hi = ((b >> 4) - 8).to(tl.float32)
            part = tl.sum(lo * xe[None, :] + hi * xo[None, :], axis=1)
        else:
            xv = tl.load(xp + g * GQ + j, mask=jm, other=0.0).to(tl.float32)
            part = tl.sum(b.to(tl.float32) * xv[None, :], axis=1)
        acc += part * s
    tl.store(y_ptr + p.to(tl.int64) * O + o, acc, mask=om)


def expert_gemv(fmt: ExpertFormat, t: dict[str, torch.Tensor], name: str, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Weights `name` of experts `rows` (int64 [P]) times x [P, K]: float32 [P, O], zero where a row
    is -1 (a choice these tensors do not hold)."""
    q, s = t[f"{name}.q"], t[f"{name}.s"]
    _, O, QK = q.shape
    NG = s.shape[-1]
    K = x.shape[1]
    y = torch.empty((rows.numel(), O), dtype=torch.float32, device=x.device)
    if y.numel():
        GQ = QK // NG
        BO = 32
        _gemv_kernel[(rows.numel(), triton.cdiv(O, BO))](
            q, s, rows, x.contiguous(), y, O, K, QK, NG, GQ,
            INT4=fmt.kind == "int4", BO=BO, BG=triton.next_power_of_2(GQ),
        )
    return y
