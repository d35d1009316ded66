"""GGUF routed-expert blocks straight into our INT4/INT8 layout (docs/quantization.md, "From GGUF
blocks"), many experts at a time, without dequantizing to float where the block's grid is ours.

A GGUF block of 32 weights is a scale and 32 small integers: Q4_0 is (fp16 d, v in [-8, 7]), Q8_0
(fp16 d, v in [-128, 127]), MXFP4 (E8M0 exponent e, v in {0, ±1, ±2, ±3, ±4, ±6, ±8, ±12} with
d = 2^(e-128)); each weight is v * d. With our group size 32 the block is our group, and where v
fits our q range (Q4_0 into INT4 or INT8, Q8_0 and MXFP4 into INT8) the block is taken as it is:
q = v, scale = bf16(d). That is exact up to the scale's rounding to bf16 (none for MXFP4, whose d
is a power of two; at most 2^-8 relative for Q4_0/Q8_0's fp16 d), and it is what the float path
(dequantize, then shared/quant.py:quantize) gives whenever max|v| is qmax; elsewhere, notably Q4_0
blocks holding -8 (llama.cpp puts the block's largest magnitude there), the float path would
re-quantize 16 levels onto 15 and lose more than the scale's rounding. Every other combination
(another group size, INT4 from Q8_0 or MXFP4, any other GGUF type) is the float path, batched.
"""

from __future__ import annotations

import numpy as np
import torch

from ..shared.quant import pack_int4, quantize

BLOCK = 32
# (GGUF type, our bits) taken block by block at group 32
NATIVE = {("Q4_0", 4), ("Q4_0", 8), ("Q8_0", 8), ("MXFP4", 8)}
_MXFP4_VALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.int8)


def native(qtype: str, bits: int, group: int) -> bool:
    return group == BLOCK and (qtype, bits) in NATIVE


def _bf16_bits(f32: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounding to nearest even as torch's conversion does."""
    u = f32.astype(np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def _fp16_scale(blocks: np.ndarray) -> np.ndarray:
    return _bf16_bits(np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0].astype(np.float32))


def _q4_0_packed(qs: np.ndarray) -> np.ndarray:
    """Q4_0's nibbles (element j low in byte j, element j+16 high in byte j) in our INT4 order
    (elements 2k, 2k+1 low and high in byte k). Both offset q by 8, so the nibbles move unchanged:
    bytes 2k and 2k+1 of the block give byte k of ours from their low nibbles and byte k+8 from
    their high ones."""
    even, odd = qs[..., 0::2], qs[..., 1::2]
    out = np.empty(qs.shape, np.uint8)
    np.bitwise_or(even & 0x0F, odd << 4, out=out[..., :8])
    np.bitwise_or(even >> 4, odd & 0xF0, out=out[..., 8:])
    return out


def _native(raw: np.ndarray, qtype: str, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """raw [..., O, K/32 * block bytes] -> (q in the stored layout, scale bf16 bits [..., O, K/32])."""
    lead = raw.shape[:-1]
    if qtype == "Q4_0":
        blocks = raw.reshape(*lead, -1, 18)
        scale, qs = _fp16_scale(blocks), blocks[..., 2:]
        if bits == 4:
            q = _q4_0_packed(qs)
        else:
            q = np.empty((*qs.shape[:-1], BLOCK), np.int8)
            q[..., :16] = (qs & 0x0F).view(np.int8) - 8
            q[..., 16:] = (qs >> 4).view(np.int8) - 8
    elif qtype == "Q8_0":
        blocks = raw.reshape(*lead, -1, 34)
        scale, q = _fp16_scale(blocks), blocks[..., 2:].view(np.int8)
    else:  # MXFP4: d = 2^(e-128), as gguf's e8m0_to_fp32_half; a power of two is exact in bf16
        blocks = raw.reshape(*lead, -1, 17)
        e = blocks[..., 0].astype(np.uint16)
        scale = np.where(e < 2, np.uint16(0x20) << e, (e - 1) << 7).astype(np.uint16)
        qs = blocks[..., 1:]
        q = np.empty((*qs.shape[:-1], BLOCK), np.int8)
        q[..., :16] = _MXFP4_VALUES[qs & 0x0F]
        q[..., 16:] = _MXFP4_VALUES[qs >> 4]
    return q.reshape(*lead, -1), scale


def convert(data: np.ndarray, qtype: str, bits: int, group_size: int, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF tensor data of n experts' weights [n, rows, cols] (raw blocks [n, rows, bytes] for a
    quantized type) -> (q, scales bf16) of shared/quant.py's layout, [n, rows, ...] each."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from ..shared.quant import group_for

    if native(qtype, bits, group_for(cols, group_size)):
        q, s = _native(np.asarray(data), qtype, bits)
        return torch.from_numpy(q), torch.from_numpy(s).view(torch.bfloat16)
    w = dequantize(np.asarray(data), GGMLQuantizationType[qtype]).reshape(-1, rows, cols)
    q, s = quantize(torch.from_numpy(np.asarray(w, dtype=np.float32)), bits, group_size)
    return (pack_int4(q) if bits == 4 else q), s
