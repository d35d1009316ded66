"""The weight quantization scheme (docs/quantization.md), one definition for every process.

Symmetric, per group of `g` consecutive input features (along K) of each output row:
    scale = bf16( max|w_group| / qmax )            qmax = 7 (INT4), 127 (INT8)
    q     = clamp( round_half_even(w / scale), -qmax - 1, qmax )     (q = 0 where scale = 0)
    w'    = q * scale
The scale is rounded to bf16 *before* q is computed, so storing it in bf16 loses nothing and the
dequantized weight is exactly q * stored_scale. Dense INT8 weights use one group per row.

Layouts, for a weight [O, K] with groups of g:
    INT8: q int8 [O, K];               scales bf16 [O, K / g]
    INT4: q uint8 [O, K / 2], byte j of a row holds (q[2j] + 8) | (q[2j + 1] + 8) << 4;
          scales bf16 [O, K / g]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

QMAX = {4: 7, 8: 127}


class QuantError(ValueError):
    pass


def group_for(k: int, group_size: int) -> int:
    """The group actually used along K: `group_size`, or all of K when K is smaller."""
    g = min(group_size, k)
    if k % g:
        raise QuantError(f"input dimension {k} is not a multiple of the quantization group size {g}")
    return g


def quantize(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., O, K] -> (q int8 [..., O, K] with values in [-qmax-1, qmax], scales bf16 [..., O, K/g])."""
    qmax = QMAX[bits]
    k = w.shape[-1]
    g = group_for(k, group_size)
    wg = w.float().reshape(*w.shape[:-1], k // g, g)
    scale = (wg.abs().amax(dim=-1) / qmax).to(torch.bfloat16)
    s = scale.float().unsqueeze(-1)
    q = torch.where(s > 0, torch.round(wg / torch.where(s > 0, s, 1.0)), 0.0)  # torch.round: half to even
    q = q.clamp(-qmax - 1, qmax).to(torch.int8).reshape(w.shape)
    return q, scale


def dequantize_q(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(q int8 [..., O, K], scales [..., O, K/g]) -> float32 [..., O, K]."""
    k, groups = q.shape[-1], scale.shape[-1]
    return (q.float().reshape(*q.shape[:-1], groups, k // groups) * scale.float().unsqueeze(-1)).reshape(q.shape)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """What the model computes with after quantization: dequantize(quantize(w)), in w's dtype."""
    return dequantize_q(*quantize(w, bits, group_size)).to(w.dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    lo = (p & 0xF).to(torch.int8) - 8
    hi = (p >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)


# --- expert-store hooks (shared/expert_store.py) -------------------------------------------------


def _bits(fmt) -> int:
    return {"int4": 4, "int8": 8}[fmt.kind]


def quantized_tensors(fmt, n: int, o: int, k: int, name: str) -> dict:
    g = group_for(k, fmt.group_size)
    if _bits(fmt) == 4:
        if k % 2:
            raise QuantError(f"INT4 needs an even input dimension, got {k}")
        qt = (torch.uint8, (n, o, k // 2))
    else:
        qt = (torch.int8, (n, o, k))
    return {f"{name}.q": qt, f"{name}.s": (torch.bfloat16, (n, o, k // g))}


def quantized(fmt, w: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
    """One expert's weight [O, K] in the stored layout: {name.q, name.s}. A weight on the CPU (what
    the converters read) takes quant_kernel.py's one pass, the same bytes."""
    bits = _bits(fmt)
    if w.device.type == "cpu" and w.is_floating_point() and (bits == 8 or w.shape[-1] % 2 == 0):
        from .quant_kernel import quantize_weight

        q, s = quantize_weight(w, bits, group_for(w.shape[-1], fmt.group_size), QMAX[bits])
        return {f"{name}.q": q, f"{name}.s": s}
    q, s = quantize(w, bits, fmt.group_size)
    return {f"{name}.q": pack_int4(q) if bits == 4 else q, f"{name}.s": s}


def dequantize(fmt, t: dict, name: str, local: int) -> torch.Tensor:
    q = t[f"{name}.q"][local]
    if _bits(fmt) == 4:
        q = unpack_int4(q)
    return dequantize_q(q, t[f"{name}.s"][local])


# --- dense weights (--attn-bits 8) ---------------------------------------------------------------


def dense_names(family) -> list[list[str]]:
    """Names of the dense weights --attn-bits 8 quantizes, grouped per layer (lm_head last, unless
    tied to the embedding, which stays unquantized): the 2-D projection weights (`*_proj*.weight`).
    Routers (`mlp.gate`), norms and embeddings are not projections, so they stay as they are."""
    out = [
        [n for n, shape in family.layer_tensors(i).items() if "_proj" in n and n.endswith(".weight") and len(shape) == 2]
        for i in range(family.num_layers)
    ]
    if not family.tie_word_embeddings:
        out.append(["lm_head.weight"])
    return out


class QuantLinear:
    """A dense weight [O, K] held as INT8 with one bf16 scale per output channel (a single group
    spanning K). shared/models/layers.py:linear() calls `matmul_t`, so model code is unchanged.
    This is the reference path: dequantize, then an ordinary matrix product."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        if q.dim() != 2 or scale.shape != (q.shape[0], 1):
            raise QuantError(f"INT8 weight {list(q.shape)} needs scales [{q.shape[0]}, 1], got {list(scale.shape)}")
        self.q, self.scale = q, scale

    @classmethod
    def quantize(cls, w: torch.Tensor) -> "QuantLinear":
        return cls(*quantize(w, 8, w.shape[-1]))

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def to(self, device) -> "QuantLinear":
        return QuantLinear(self.q.to(device), self.scale.to(device))

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """dequantize_q(q, scale) rounded to dtype. In the scales' own dtype, q * scale there: torch
        multiplies 16-bit values in float32 and rounds once, and q (7 bits) and its product with a
        scale (15 bits) are exact in float32, so the bits are the same, with 2-byte temporaries
        where the float32 path writes and reads 4-byte ones (a prefill chunk dequantizes every
        product: ~80-100 us each on an H100 that way)."""
        if dtype == self.scale.dtype:
            return self.q.to(dtype) * self.scale
        return dequantize_q(self.q, self.scale).to(dtype)

    def matmul_t(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype))
