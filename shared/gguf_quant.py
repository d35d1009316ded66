"""GGUF expert blocks (Q4_0, Q8_0, MXFP4) straight into our INT4/INT8 layout (shared/quant.py), in
one compiled pass over the file's bytes on every core.

The result is byte for byte what the float path gives (`reference`: gguf.quants.dequantize, then
quant.quantize), so a cache does not depend on how it was built: each row is decoded into float32
exactly as gguf.quants.dequantize decodes it (the products of a small integer and an fp16 or
power-of-two scale are exact), then quantized with the scheme's float32 arithmetic (scale =
bf16(max|w| / qmax), q = round_half_even(w / scale), clamped). Where the scheme's result is known
without that arithmetic, it is taken from the block's integers: at group size 32, a Q4_0 block
(into INT4) or a Q8_0 block (into INT8) whose largest code is qmax keeps its codes (negated when d
is negative) and gets scale bf16(|d|); the codes survive the scale's rounding because
qmax * 2^-9 < 1/2. docs/quantization.md says which blocks keep their values and which are
re-quantized, and why the scheme was not bent to keep them all.

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
def _convert(raw, kind, bits, group, q, s):
    """raw uint8 [R, row bytes] -> q (uint8 [R, K/2] or int8 [R, K]), s (bf16 bits, uint16 [R, K/g])."""
    R, G = raw.shape[0], s.shape[1]
    K = G * group
    qmax = 7 if bits == 4 else 127
    # a block whose largest code is qmax keeps its codes (module docstring)
    keeps = group == QK and ((kind == 0 and bits == 4) or (kind == 1 and bits == 8))
    for r in prange(R):
        row = raw[r]
        codes = np.empty(K, np.int32)
        ds = np.empty(K // QK, np.float32)
        vals = np.empty(group, np.int32)
        for b in range(K // QK):
            ds[b] = _block(row, kind, b, codes)
        for g in range(G):
            k0, k1 = g * group, (g + 1) * group
            # max|w| from the codes: |d * c| = |d| * |c| exactly, so per block it is |d| * max|c|
            amax, m, k = np.float32(0.0), 0, k0
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
            k = k0
            while k < k1:
                end = min(k1, (k // QK + 1) * QK)
                d = ds[k // QK]
                if keeps and m == qmax and d != 0 and np.isfinite(d):
                    sign = 1 if d > 0 else -1
                    for kk in range(k, end):
                        vals[kk - k0] = sign * codes[kk]
                elif sf > 0:
                    for kk in range(k, end):
                        v = np.int32(np.rint(d * np.float32(codes[kk]) / sf))  # sf >= ~max|w| / 2 qmax: fits
                        vals[kk - k0] = min(max(v, -qmax - 1), qmax)
                else:
                    vals[k - k0 : end - k0] = 0
                k = end
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
    _convert(flat, _KIND[qtype], bits, g, q, s)
    return (torch.from_numpy(q.reshape(*lead, q.shape[-1])),
            torch.from_numpy(s.reshape(*lead, s.shape[-1])).view(torch.bfloat16))


def reference(raw: np.ndarray, qtype: str, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The float path `convert` must match: gguf's dequantization, then the scheme's quantization."""
    import gguf

    w = torch.from_numpy(np.array(gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, qtype)), np.float32))
    q, s = quantize(w, bits, group_size)
    return (pack_int4(q) if bits == 4 else q), s

