"""The Triton kernel of dequant.py: one pass that gathers the experts' rows, unpacks, scales and
writes each weight once. dequant.py:dequant_reference is its reference (tests/test_dequant.py,
bit-identical on CUDA)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..shared.expert_store import ExpertFormat


@triton.jit
def int4_pair(b):
    """Stored INT4 bytes (int32) -> their two weights each, float32, the low nibble first (shared/
    quant.py's layout; every kernel that reads INT4 experts unpacks them here)."""
    return ((b & 15) - 8).to(tl.float32), ((b >> 4) - 8).to(tl.float32)


@triton.jit
def _dequant_kernel(q_ptr, s_ptr, rows_ptr, out_ptr, O, QK, NG, GROUP_Q, INT4: tl.constexpr, BLOCK: tl.constexpr):
    # one program: BLOCK stored bytes (int4: 2 weights each) of output row r = g * O + o
    r = tl.program_id(0)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = j < QK
    src = tl.load(rows_ptr + r // O).to(tl.int64) * O + r % O
    b = tl.load(q_ptr + src * QK + j, mask=m, other=0).to(tl.int32)
    s = tl.load(s_ptr + src * NG + j // GROUP_Q, mask=m, other=0.0).to(tl.float32)
    dst = out_ptr + r.to(tl.int64) * QK * (2 if INT4 else 1)
    if INT4:
        lo, hi = int4_pair(b)
        lo, hi = lo * s, hi * s
        tl.store(dst + 2 * j, lo.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=m)
        tl.store(dst + 2 * j + 1, hi.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=m)
    else:
        tl.store(dst + j, (b.to(tl.float32) * s).to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=m)



def dequant_triton(fmt: ExpertFormat, t: dict[str, torch.Tensor], name: str, rows: torch.Tensor, dtype) -> torch.Tensor:
    q, s = t[f"{name}.q"].contiguous(), t[f"{name}.s"].contiguous()
    n, O, QK = q.shape
    int4 = fmt.kind == "int4"
    K = QK * 2 if int4 else QK
    NG = s.shape[-1]
    out = torch.empty((rows.numel(), O, K), dtype=dtype, device=q.device)
    if out.numel():
        BLOCK = 512
        grid = (rows.numel() * O, triton.cdiv(QK, BLOCK))
        _dequant_kernel[grid](q, s, rows, out, O, QK, NG, (K // NG) // (2 if int4 else 1), INT4=int4, BLOCK=BLOCK)
    return out
