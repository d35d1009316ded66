"""One quantized expert projection per row, dequantized in the kernel (hcs_hybrid decode's GPU share,
moe_gpu.moe_pairs):

    y[p, o] = sum over groups g of  s[rows[p], o, g] * sum over k in g of  q[rows[p], o, k] * x[p, k]

in float32, for INT4 (q = nibble - 8, two per byte, the low nibble first) and INT8 experts. A
decode step multiplies each chosen expert by one vector, so the work is reading the expert's bytes
once: dequantizing to bf16 first (dequant_kernel.py) writes and reads them again at four times the
size, and a layer's 8 experts took ~160 us that way on the lent H200 against the pool's turn.

With several sequences in a step, many pairs choose the same expert (32 sequences: 256 pairs over
~112 of Qwen3's 128 experts), and one program per pair read each such expert once per pair: a
16-sequence step of an all-hot Qwen3-30B-A3B took 54.7 ms on an H100 against 13.1 at 4. Given the
pairs sorted by expert (`sorted_rows`), the first pair of each run of equal rows takes the whole run:
its block of weights comes from HBM once and from L1 for the run's other pairs, and every pair's sum
is formed in the same order as alone, so the result does not depend on which pairs share a step.

The reference is dequant.py's dequant_reference followed by a float32 matrix-vector product
(tests/test_dequant.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..shared.expert_store import ExpertFormat


@triton.jit(do_not_specialize=["P"])  # one compilation whatever a step's count of pairs
def _gemv_kernel(q_ptr, s_ptr, rows_ptr, x_ptr, y_ptr, P, O, K, QK, NG, GQ,
                 INT4: tl.constexpr, SORTED: tl.constexpr, BO: tl.constexpr, BG: tl.constexpr):
    # one program: BO output rows of pair p's expert, over all K in groups (GQ stored bytes each), for
    # pair p alone, or (SORTED) for the run of pairs p..e-1 with p's row when p starts that run
    p = tl.program_id(0)
    r = tl.load(rows_ptr + p)
    e = p + 1
    if SORTED:
        if p > 0:
            if tl.load(rows_ptr + p - 1) == r:
                e = p  # an earlier program takes this pair with the rest of its run
        if e > p:
            while (e < P) & (tl.load(rows_ptr + e, mask=e < P, other=-1) == r):
                e += 1
    o = tl.program_id(1) * BO + tl.arange(0, BO)
    om = o < O
    j = tl.arange(0, BG)
    jm = j < GQ
    wrow = r.to(tl.int64) * O + o  # [BO] rows of the expert's weight
    m = om[:, None] & jm[None, :]
    ng = tl.where(r >= 0, NG, 0)  # row -1: a pair the tensors do not hold, whose output is zero
    for i in range(p, e):
        acc = tl.zeros((BO,), tl.float32)
        xp = x_ptr + tl.cast(i, tl.int64) * K
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
        tl.store(y_ptr + tl.cast(i, tl.int64) * O + o, acc, mask=om)


def expert_gemv(fmt: ExpertFormat, t: dict[str, torch.Tensor], name: str, rows: torch.Tensor, x: torch.Tensor,
                sorted_rows: bool = False) -> torch.Tensor:
    """Weights `name` of experts `rows` (int64 [P]) times x [P, K]: float32 [P, O], zero where a row
    is -1 (a choice these tensors do not hold). `sorted_rows`: rows is in ascending order, and each
    expert is read once for all its pairs."""
    q, s = t[f"{name}.q"], t[f"{name}.s"]
    _, O, QK = q.shape
    NG = s.shape[-1]
    K = x.shape[1]
    y = torch.empty((rows.numel(), O), dtype=torch.float32, device=x.device)
    if y.numel():
        GQ = QK // NG
        BO = 32
        _gemv_kernel[(rows.numel(), triton.cdiv(O, BO))](
            q, s, rows, x.contiguous(), y, rows.numel(), O, K, QK, NG, GQ,
            INT4=fmt.kind == "int4", SORTED=sorted_rows, BO=BO, BG=triton.next_power_of_2(GQ),
        )
    return y
