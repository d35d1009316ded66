"""Expert weights from the stored INT4/INT8 layout (shared/quant.py) to the compute dtype, on the
worker's device, for the experts a prefill step uses:

    W[g, o, k] = q[rows[g], o, k] * s[rows[g], o, k // group]        (int4: q = nibble - 8)

`dequant_reference` is the plain torch form (several passes over the weights); `dequant_triton` is
one pass that gathers the rows, unpacks, scales and writes each weight once, which matters on the
prefill path: at a 10K-token prompt a Qwen3-30B layer dequantizes ~0.6 G weights, and each extra
pass over their bf16 form costs ~1 ms of HBM time. The product of an integer in [-8, 127] and a
bf16 scale is exact in float32, so both round once, to the same values.
"""

from __future__ import annotations

import torch

from ..shared.expert_store import ExpertFormat

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference serves
    triton = None


def dequant_reference(fmt: ExpertFormat, t: dict[str, torch.Tensor], name: str, rows: torch.Tensor, dtype) -> torch.Tensor:
    """Weights `name` of experts `rows` (int64 [G]) as `dtype` [G, O, K]."""
    if fmt.kind == "dense":
        return t[name].index_select(0, rows).to(dtype)
    q = t[f"{name}.q"].index_select(0, rows)
    s = t[f"{name}.s"].index_select(0, rows)
    wide = torch.float32 if dtype == torch.float32 else dtype
    if fmt.kind == "int4":
        w = torch.stack([q & 0xF, q >> 4], dim=-1).flatten(-2).to(wide).sub_(8)
    else:
        w = q.to(wide)
    G, O, K = w.shape
    groups = s.shape[-1]
    w = w.view(G, O, groups, K // groups).mul_(s.to(wide).unsqueeze(-1))
    return w.view(G, O, K).to(dtype)


if triton is not None:

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
            lo = ((b & 15) - 8).to(tl.float32) * s
            hi = ((b >> 4) - 8).to(tl.float32) * s
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


def dequant_rows(fmt: ExpertFormat, t: dict[str, torch.Tensor], name: str, rows: torch.Tensor, dtype) -> torch.Tensor:
    """dequant_triton on CUDA for the quantized formats, else the reference."""
    if triton is not None and fmt.kind != "dense" and t[f"{name}.q"].is_cuda:
        return dequant_triton(fmt, t, name, rows, dtype)
    return dequant_reference(fmt, t, name, rows, dtype)
