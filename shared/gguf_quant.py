"""GGUF expert blocks (Q4_0, Q8_0, MXFP4) straight into our INT4/INT8 layout (shared/quant.py), in
one compiled pass over the file's bytes on every core.

Where a block is one of our groups and its codes fit our codes (Q4_0 into INT4, Q8_0 into INT8, at
group size 32), the block is kept: its codes are stored as they are and its fp16 scale d rounded to
bf16, so the weights are the file's exactly when d has at most 8 significant bits, and within
2^-8 of them (relative) otherwise. A negative d is taken as |d| with the codes negated, as the
scheme does, except in a block that uses code -qmax-1 (Q4_0's -8, which llama.cpp's quantizer gives
every block's largest weight), whose negation does not fit: there the stored scale is negative.
Where the scheme's own result keeps the codes (the largest code is qmax), the kept block is byte
for byte that result.

Everything else is re-quantized, and byte for byte what the float path gives (`reference`:
gguf.quants.dequantize, then quant.quantize): each row is decoded into float32 exactly as
gguf.quants.dequantize decodes it (a small integer times an fp16 or power-of-two scale is exact),
then quantized with the scheme's float32 arithmetic (scale = bf16(max|w| / qmax), q =
round_half_even(w / scale), clamped). docs/quantization.md has the table and the reasons.

Speed is what this is for: the float path runs numpy over each expert in turn (one core, several
passes through memory per weight); this reads each source byte once and writes each output byte
once, rows spread over numba's threads (it releases the GIL, so a writer can run beside it).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from .float_bits import bf16_to_f32, f16_to_f32, f32_to_bf16, u32_as_f32
from .quant import group_for, pack_int4, quantize

QK = 32  # weights per block in all three types
BLOCK_BYTES = {"Q4_0": 18, "Q8_0": 34, "MXFP4": 17}
FAST_TYPES = tuple(BLOCK_BYTES)
_KIND = {"Q4_0": 0, "Q8_0": 1, "MXFP4": 2}
# MXFP4's E2M1 values doubled, as ggml's kvalues_mxfp4 (the scale is halved to match)
_MXFP4_CODES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.int32)


@njit(inline="always")
def _e8m0_half(e):
    """ggml_e8m0_to_fp32_half: 2^(e - 128) as float32 (subnormal below e = 2)."""
    if e < 2:
        return u32_as_f32(np.uint32(0x00200000) << np.uint32(e))
    return u32_as_f32(np.uint32(e - 1) << np.uint32(23))


@njit(inline="always")
def _block(row, kind, b, codes):
    """Block b of a row: its 32 integer codes into codes[32b:32b+32] and its scale d (float32), so
    that gguf.quants.dequantize's weight is exactly d * code (MXFP4's codes being ggml's doubled
    E2M1 values, its d the halved E8M0 scale)."""
    o = b * QK
    if kind == 0:
        base = b * 18
        for j in range(16):
            byte = np.int32(row[base + 2 + j])
            codes[o + j] = (byte & 15) - 8
            codes[o + j + 16] = (byte >> 4) - 8
        return f16_to_f32(row[base], row[base + 1])
    if kind == 1:
        base = b * 34
        for j in range(32):
            v = np.int32(row[base + 2 + j])
            codes[o + j] = v - 256 if v > 127 else v
        return f16_to_f32(row[base], row[base + 1])
    base = b * 17
    for j in range(16):
        byte = row[base + 1 + j]
        codes[o + j] = _MXFP4_CODES[byte & 15]
        codes[o + j + 16] = _MXFP4_CODES[byte >> 4]
    return _e8m0_half(row[base])


@njit(parallel=True, nogil=True, cache=True)
def _convert(raw, kind, bits, group, keeps, q, s):
    """raw uint8 [R, row bytes] -> q (uint8 [R, K/2] or int8 [R, K]), s (bf16 bits, uint16 [R, K/g]);
    `keeps`: blocks are groups whose codes fit ours (keeps_blocks)."""
    R, G = raw.shape[0], s.shape[1]
    K = G * group
    qmax = 7 if bits == 4 else 127
    for r in prange(R):
        row = raw[r]
        codes = np.empty(K, np.int32)
        ds = np.empty(K // QK, np.float32)
        vals = np.empty(group, np.int32)
        for b in range(K // QK):
            ds[b] = _block(row, kind, b, codes)
        for g in range(G):
            k0, k1 = g * group, (g + 1) * group
            d = ds[g] if keeps else np.float32(0.0)
            if keeps and d != 0 and np.isfinite(d):
                # d > 0, or d < 0 with no code at -qmax-1 to negate: the scheme's own result (when
                # its largest code is qmax); else the scale keeps d's sign
                flip = d < 0
                for k in range(k0, k1):
                    flip = flip and codes[k] != -qmax - 1
                sign = -1 if flip else 1
                s[r, g] = f32_to_bf16(-d if flip else d)
                for k in range(k0, k1):
                    vals[k - k0] = sign * codes[k]
            else:
                # max|w| from the codes: |d * c| = |d| * |c| exactly, so per block it is |d| * max|c|
                amax, k = np.float32(0.0), k0
                while k < k1:
                    end = min(k1, (k // QK + 1) * QK)
                    m = 0
                    for kk in range(k, end):
                        m = max(m, abs(codes[kk]))
                    amax = max(amax, np.float32(m) * abs(ds[k // QK]))
                    k = end
                sb = f32_to_bf16(amax / np.float32(qmax))
                s[r, g] = sb
                sf = bf16_to_f32(sb)
                for k in range(k0, k1):
                    v = 0
                    if sf > 0:  # int32 holds it: sf >= ~max|w| / (2 qmax)
                        v = min(max(np.int32(np.rint(ds[k // QK] * np.float32(codes[k]) / sf)), -qmax - 1), qmax)
                    vals[k - k0] = v
            if bits == 8:
                for j in range(group):
                    q[r, k0 + j] = vals[j]
            else:
                for j in range(group // 2):
                    q[r, k0 // 2 + j] = (vals[2 * j] + 8) | ((vals[2 * j + 1] + 8) << 4)


def convert(raw: np.ndarray, qtype: str, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF blocks raw (uint8 [..., rows, K / 32 * block bytes]) of `qtype` -> (q, scales) in the
    stored layout of quant.quantized: q uint8 [..., rows, K/2] (INT4) or int8 [..., rows, K] (INT8),
    scales bf16 [..., rows, K/g]."""
    lead, row_bytes = raw.shape[:-1], raw.shape[-1]
    k = row_bytes // BLOCK_BYTES[qtype] * QK
    g = group_for(k, group_size)
    flat = np.ascontiguousarray(raw).reshape(-1, row_bytes)
    q = np.empty((flat.shape[0], k // 2 if bits == 4 else k), np.uint8 if bits == 4 else np.int8)
    s = np.empty((flat.shape[0], k // g), np.uint16)
    _convert(flat, _KIND[qtype], bits, g, keeps_blocks(qtype, bits, g), q, s)
    return (torch.from_numpy(q.reshape(*lead, q.shape[-1])),
            torch.from_numpy(s.reshape(*lead, s.shape[-1])).view(torch.bfloat16))


def keeps_blocks(qtype: str, bits: int, group_size: int) -> bool:
    """Whether `convert` keeps blocks whose scale is finite and not zero (module docstring)."""
    return group_size == QK and (qtype, bits) in (("Q4_0", 4), ("Q8_0", 8))


def reference(raw: np.ndarray, qtype: str, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The float path: gguf's dequantization, then the scheme's quantization (what `convert` gives
    for every block it does not keep)."""
    import gguf

    w = torch.from_numpy(np.array(gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, qtype)), np.float32))
    q, s = quantize(w, bits, group_size)
    return (pack_int4(q) if bits == 4 else q), s

