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
re-quantize 16 levels onto 15 and lose more than the scale's rounding. MXFP4 into INT4 at group
32 is re-quantized by table (_mxfp4_int4): the float path's bytes without its float operations.
Every other combination (another group size, INT4 from Q8_0, any other GGUF type) is the float
path, batched.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
import torch

from ..shared.quant import QMAX, quantize
from ..shared.quant_kernel import quantize_row, quantize_weight, store_row

BLOCK = 32
# (GGUF type, our bits) whose blocks are taken as they are at group 32
NATIVE = {("Q4_0", 4), ("Q4_0", 8), ("Q8_0", 8), ("MXFP4", 8)}
# ... and those whose group 32 is computed from its block alone, without float operations
BLOCKWISE = NATIVE | {("MXFP4", 4)}
BYTES = {"Q4_0": 18, "Q8_0": 34, "MXFP4": 17}
_MXFP4_VALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.int8)


def native(qtype: str, bits: int, group: int) -> bool:
    return group == BLOCK and (qtype, bits) in NATIVE


def _bf16_bits(f32: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounding to nearest even as torch's conversion does."""
    u = f32.astype(np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


@functools.cache
def _fp16_to_bf16() -> np.ndarray:
    """bf16 bits of every fp16 bit pattern (numpy converts fp16 in software, ~20 ns a value)."""
    return _bf16_bits(np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32))


@numba.njit(nogil=True, cache=True)
def _q4_0_split(blocks: np.ndarray, table: np.ndarray, q: np.ndarray, s: np.ndarray) -> None:
    """Q4_0 blocks [n, 18] -> q [n, 16] in our INT4 order and s [n] (bf16 bits of the scale through
    `table`, _fp16_to_bf16), in one pass. Q4_0 has element j low and element j+16 high in byte j;
    ours has elements 2k and 2k+1 low and high in byte k. Both offset q by 8, so the nibbles move
    unchanged: bytes 2k and 2k+1 of the block give byte k of ours from their low nibbles and byte
    k+8 from their high ones. numpy does this at a tenth of the speed (strided byte slices);
    `_q4_0_split_reference` is that version."""
    for i in range(blocks.shape[0]):
        s[i] = table[blocks[i, 0] | (np.uint16(blocks[i, 1]) << 8)]
        for k in range(8):
            a, b = blocks[i, 2 + 2 * k], blocks[i, 3 + 2 * k]
            q[i, k] = (a & 0x0F) | ((b & 0x0F) << 4)
            q[i, k + 8] = (a >> 4) | (b & 0xF0)


def _q4_0_split_reference(blocks: np.ndarray, table: np.ndarray, q: np.ndarray, s: np.ndarray) -> None:
    even, odd = blocks[:, 2::2], blocks[:, 3::2]
    np.bitwise_or(even & 0x0F, odd << 4, out=q[:, :8])
    np.bitwise_or(even >> 4, odd & 0xF0, out=q[:, 8:])
    s[:] = _bf16_bits(np.ascontiguousarray(blocks[:, :2]).view(np.float16)[:, 0].astype(np.float32))


@numba.njit(nogil=True, cache=True)
def _requantize(v: np.ndarray, d: np.ndarray, g: int, qmax: int, bits: int, q: np.ndarray, s: np.ndarray) -> None:
    """shared/quant.py's quantize of the weights v * d (v int8 [R, K], d float32 [R, K/32], one per
    block) into q (stored: uint8 [R, K/2] packed for bits 4, int8 [R, K] for 8) and bf16 bits s
    [R, K/g] (quant_kernel.quantize_row: the same float32 operations in the same order), so the bytes
    are the float path's (tests/test_gguf_blocks.py compares them) without its float32 copies of the
    weights or the packing's."""
    x = np.empty(v.shape[1], np.float32)
    row = np.empty(v.shape[1], np.int8)
    for r in range(v.shape[0]):
        for k in range(v.shape[1]):
            x[k] = np.float32(v[r, k]) * d[r, k // 32]
        quantize_row(x, g, qmax, row, s[r])
        store_row(row, bits, q[r])


# MXFP4 into INT4 at group 32, by table. A block's weights are v * 2^k (k = e - 128): the float
# path's amax is max|v| * 2^k exactly, and as long as amax / 7 and its bf16 rounding are normal
# floats, scaling by 2^k commutes with both roundings, so the scale is S[m] * 2^k and each q is
# round(v / S[m]), where m is the block's largest FP4 magnitude index: a function of (m, FP4 code)
# only. Normal needs 2^k / 7 >= 2^-126 (m = 1, the smallest nonzero amax: v = 1), so e >= 5; and
# 12 * 2^k must stay finite, e <= 252. Blocks outside [5, 252] take the float path.
_MXFP4_TABLE_E = (5, 252)


@functools.cache
def _mxfp4_int4_tables() -> tuple[np.ndarray, np.ndarray]:
    """For each largest magnitude index m of a block: the INT4 nibble (q + 8) of each FP4 code and
    the scale's bf16 bits at e = 128, both from shared/quant.py's quantize of a block at e = 128
    whose largest magnitude is m's (codes above m cannot occur with it: they are given 0)."""
    m = np.arange(8)[:, None]
    v = np.where(np.arange(16) % 8 <= m, _MXFP4_VALUES, 0)
    w = torch.from_numpy(np.concatenate([v, np.repeat(_MXFP4_VALUES[:8, None], 16, axis=1)], axis=1).astype(np.float32))
    q, scale = quantize(w, 4, BLOCK)
    return (q[:, :16].numpy() + 8).astype(np.uint8), scale.view(torch.int16).numpy().view(np.uint16)[:, 0]


@numba.njit(nogil=True, cache=True)
def _mxfp4_int4_kernel(blocks: np.ndarray, nibble: np.ndarray, scale: np.ndarray, q: np.ndarray, s: np.ndarray) -> None:
    """MXFP4 blocks [n, 17] -> q [n, 16] packed INT4 and s [n] bf16 bits, through
    _mxfp4_int4_tables. The element order moves as in _q4_0_split (MXFP4 also holds j low and j + 16
    high in byte j). The scale's exponent is S[m]'s plus k, valid for e in _MXFP4_TABLE_E only."""
    for i in range(blocks.shape[0]):
        m = 0
        for j in range(1, 17):
            m = max(m, blocks[i, j] & 7, (blocks[i, j] >> 4) & 7)
        t = nibble[m]
        s[i] = scale[m] + (np.int32(blocks[i, 0]) - 128) * 128 if m else 0
        for k in range(8):
            a, b = blocks[i, 1 + 2 * k], blocks[i, 2 + 2 * k]
            q[i, k] = t[a & 0x0F] | (t[b & 0x0F] << 4)
            q[i, k + 8] = t[a >> 4] | (t[b >> 4] << 4)


def _mxfp4_int4(blocks: np.ndarray, q: np.ndarray, s: np.ndarray) -> None:
    """MXFP4 blocks [n, 17] into INT4 at group 32 (q [n, 16] packed, s [n] bf16 bits): the table
    where it holds, the float path (_requantized) for the blocks of extreme exponents."""
    _mxfp4_int4_kernel(blocks, *_mxfp4_int4_tables(), q, s)
    lo, hi = _MXFP4_TABLE_E
    far = np.flatnonzero((blocks[:, 0] < lo) | (blocks[:, 0] > hi))
    if far.size:
        fq, fs = _requantized(blocks[far], "MXFP4", BLOCK, BLOCK, 4)
        q[far], s[far] = fq, fs[:, 0]


def _blocks(raw: np.ndarray, qtype: str) -> np.ndarray:
    return raw.reshape(*raw.shape[:-1], -1, BYTES[qtype])


def _scales(blocks: np.ndarray, qtype: str) -> np.ndarray:
    """Each block's d as float32, as gguf.quants computes it."""
    if qtype == "MXFP4":  # 2^(e-128), gguf's e8m0_to_fp32_half
        e = blocks[..., 0].astype(np.uint32)
        return np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << np.uint32(23)).astype(np.uint32).view(np.float32)
    return np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0].astype(np.float32)


def _values(blocks: np.ndarray, qtype: str) -> np.ndarray:
    """Each block's 32 integers v (the weight is v * d), int8 [..., blocks, 32], in element order."""
    if qtype == "Q8_0":
        return blocks[..., 2:].view(np.int8)
    qs = blocks[..., 1:] if qtype == "MXFP4" else blocks[..., 2:]
    v = np.empty((*qs.shape[:-1], BLOCK), np.int8)
    if qtype == "MXFP4":
        v[..., :16], v[..., 16:] = _MXFP4_VALUES[qs & 0x0F], _MXFP4_VALUES[qs >> 4]
    else:
        v[..., :16], v[..., 16:] = (qs & 0x0F).view(np.int8) - 8, (qs >> 4).view(np.int8) - 8
    return v


def _requantized(blocks: np.ndarray, qtype: str, cols: int, g: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The float path from blocks: q as stored ([R, cols / 2] packed for bits 4, int8 [R, cols] for
    8) and bf16 bits s [R, cols / g] (_requantize)."""
    v = np.ascontiguousarray(_values(blocks, qtype)).reshape(-1, cols)
    q = np.empty((v.shape[0], cols // 2), np.uint8) if bits == 4 else np.empty(v.shape, np.int8)
    s = np.empty((v.shape[0], cols // g), np.uint16)
    _requantize(v, np.ascontiguousarray(_scales(blocks, qtype)).reshape(v.shape[0], -1), g, QMAX[bits], bits, q, s)
    return q, s


def convert(data: np.ndarray, qtype: str, bits: int, group_size: int, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF tensor data of n experts' weights [n, rows, cols] (raw blocks [n, rows, bytes] for a
    quantized type) -> (q, scales bf16) of shared/quant.py's layout, [n, rows, ...] each."""
    from ..shared.quant import group_for

    data = np.asarray(data)
    g = group_for(cols, group_size)
    if qtype in BYTES:
        blocks = _blocks(data, qtype)
        if g == BLOCK and (qtype, bits) in BLOCKWISE:
            if bits == 4:
                n = blocks.size // BYTES[qtype]
                q, s = np.empty((n, 16), np.uint8), np.empty(n, np.uint16)
                flat = np.ascontiguousarray(blocks).reshape(n, BYTES[qtype])
                if qtype == "Q4_0":
                    _q4_0_split(flat, _fp16_to_bf16(), q, s)
                else:
                    _mxfp4_int4(flat, q, s)
            elif qtype == "MXFP4":
                q, s = _values(blocks, qtype), _bf16_bits(_scales(blocks, qtype))
            else:
                q, s = _values(blocks, qtype), _fp16_to_bf16()[np.ascontiguousarray(blocks[..., :2]).view(np.uint16)[..., 0]]
            return (torch.from_numpy(np.ascontiguousarray(q).reshape(*data.shape[:-1], -1)),
                    torch.from_numpy(s.reshape(blocks.shape[:-1])).view(torch.bfloat16))
        q, s = _requantized(blocks, qtype, cols, g, bits)
        return torch.from_numpy(q).reshape(-1, rows, q.shape[-1]), torch.from_numpy(s).view(torch.bfloat16).reshape(-1, rows, cols // g)
    else:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        w = np.asarray(dequantize(data, GGMLQuantizationType[qtype]), dtype=np.float32).reshape(-1, rows, cols)
        return quantize_weight(torch.from_numpy(w), bits, g, QMAX[bits])
