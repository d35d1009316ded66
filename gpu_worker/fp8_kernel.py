"""The Triton kernel behind kv_cache.fp8_quantize on CUDA: each cached row (a token's head) encoded
as e4m3 values with one float32 scale, amax / 448, in one pass.

Why: in torch the encoding is six kernels per tensor (a float32 cast, abs, amax, the division by
448 and its clamp, the division of the row and the cast to e4m3), twelve per decode layer for K and
V, ~15 us of a decode layer's ~120 us of GPU work outside the CPU pool's turn on the lent H100.

Arithmetic is kv_cache.fp8_quantize_reference's: scale = max(amax(|x|) * float32(1 / 448), 1e-12)
and q = e4m3(x / scale), x in float32, the division IEEE round-to-nearest (libdevice's div_rn, as
torch's tensor division is), the cast rounding to nearest even: the same bits. Under Triton's
interpreter (tests) plain division stands in.

CUDA graphs: no host syncs; the outputs are allocated from the input's shape, or are the cache's
rows (KVCache.append writes a decode step's K and V straight into them: no copy after).
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .cache_rows import ALIGN as _ALIGN, anchor

ALIGN = tl.constexpr(_ALIGN)

# kv_cache.FP8_MAX, from the same source: kv_cache imports this module, so it cannot import back.
_INV_FP8_MAX = tl.constexpr(1.0 / torch.finfo(torch.float8_e4m3fn).max)
_LIBDEVICE = tl.constexpr(not triton.knobs.runtime.interpret)


@triton.jit
def _div(a, b):
    if _LIBDEVICE:
        return libdevice.div_rn(a, b)
    else:
        return a / b


@triton.jit
def _rows(x_ptr, x2_ptr, q_ptr, s_ptr, TABLE, rows_per_seq, D, heads, width, part, BLOCK: tl.constexpr, FP8: tl.constexpr,
          SCATTER: tl.constexpr):
    """Row r of sequence b's rows in x [B * rows_per_seq, D], encoded (FP8) or cast, into q_ptr /
    s_ptr: when SCATTER, into its cache's rows from its first new position, as the table says
    (cache_rows.offsets: `part`'s values and scales from their anchors, the position last, `width`
    per sequence); else one after another. Programs of grid index 1 on axis 2 take x2 (of x's
    shape) into the part after `part` (K and V in one launch)."""
    r = tl.program_id(0)
    b = tl.program_id(1)
    if tl.program_id(2) == 1:
        x_ptr = x2_ptr
    # not `part += 1` above: Triton compiles an argument of 1 as a constant, which cannot change type
    # in a branch (DeepSeek's MLA cache writes its rope keys as part 1 alone: a CompilationError)
    part = part + tl.program_id(2)
    cols = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + (b * rows_per_seq + r) * D + cols, mask=cols < D, other=0.0).to(tl.float32)
    if SCATTER:
        seq = TABLE + b * width
        row = tl.load(seq + width - 1) * heads + r
        q_ptr += tl.multiple_of(tl.load(seq + 2 * part), ALIGN) + row * D  # cache_rows.ALIGN: 16-byte stores
        s_ptr += tl.multiple_of(tl.load(seq + 2 * part + 1), ALIGN) + row
    else:
        q_ptr += (b * rows_per_seq + r) * D
        s_ptr += b * rows_per_seq + r
    if FP8:
        scale = tl.maximum(tl.max(tl.abs(x), 0) * _INV_FP8_MAX, 1e-12)
        tl.store(q_ptr + cols, _div(x, scale).to(tl.float8e4nv), mask=cols < D)
        tl.store(s_ptr, scale)
    else:
        tl.store(q_ptr + cols, x.to(q_ptr.dtype.element_ty), mask=cols < D)


def fp8_quantize_triton(t: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """t [..., d] -> (float8_e4m3fn values [..., d], float32 scales [..., 1]), written into `out`
    (contiguous, those shapes) when given."""
    t = t.contiguous()
    d = t.shape[-1]
    if out is None:
        q = torch.empty(t.shape, dtype=torch.float8_e4m3fn, device=t.device)
        s = torch.empty(*t.shape[:-1], 1, dtype=torch.float32, device=t.device)
    else:
        q, s = out
        if q.shape != t.shape or s.shape != (*t.shape[:-1], 1) or not (q.is_contiguous() and s.is_contiguous()):
            raise ValueError(f"fp8 rows of {list(t.shape)} into {list(q.shape)} and {list(s.shape)}")
    rows = t.numel() // d if d else 0
    if rows:
        _rows[(rows, 1, 1)](t, t, q, s, s, rows, d, 0, 0, 0, BLOCK=triton.next_power_of_2(d), FP8=True, SCATTER=False)
    return q, s


def write_rows_triton(parts: Sequence[torch.Tensor], dtype: torch.dtype, table: torch.Tensor, width: int) -> None:
    """A decode step's new entries of each stored part into every sequence's cache, parts[i] into
    part i: t [B * n, H, d] holds n rows of each of B sequences, one sequence after another; each goes
    into its cache's rows of the part from its first new position, as `table` says
    (cache_rows.offsets, on t's device, `width` per sequence), encoded as fp8_quantize_triton does
    where the cache's values are e4m3 (`dtype`), else cast to `dtype`. Every cache is contiguous.
    Two parts of one shape (K and V) go in one launch (a decode layer is bound by its launches)."""
    i = 0
    while i < len(parts):
        t = parts[i].contiguous()
        pair = i + 1 < len(parts) and parts[i + 1].shape == t.shape and parts[i + 1].dtype == t.dtype
        t2 = parts[i + 1].contiguous() if pair else t
        B, (H, d) = table.numel() // width, t.shape[1:]
        per = t.shape[0] // B * H
        _rows[(per, B, 2 if pair else 1)](
            t, t2, anchor(dtype, t.device), anchor(torch.float32, t.device), table, per, d, H, width, i,
            BLOCK=triton.next_power_of_2(d), FP8=dtype == torch.float8_e4m3fn, SCATTER=True)
        i += 2 if pair else 1
