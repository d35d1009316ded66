"""shared/quant.py's quantize and pack of a weight in one pass (numba), for the CPU converters
(`convert` from 16-bit shards or GGUF's float and K-quant tensors, `synth --expert-bits`).

The torch expression makes six float32 copies of the weight (float, |w|, w / s, round, where, clamp)
and packs INT4 through two more; each copy of a multi-MB expert is fresh memory the kernel pages in,
so converting a checkpoint spent more time in page faults than in arithmetic. Here a row is widened
to float32 once (exactly) and each group read twice (its max, then its codes), with the same float32
operations: max|w| / qmax, rounded to bf16 to nearest even, then round_half_even(w / scale)
clamped. tests/test_quant.py compares the bytes with quant.py's.
"""

from __future__ import annotations

import numba
import numpy as np
import torch


@numba.njit(nogil=True, cache=True)
def quantize_row(x: np.ndarray, g: int, qmax: int, q: np.ndarray, s: np.ndarray) -> None:
    """One row of float32 weights x [K] -> q int8 [K] and bf16 bits s [K / g], quant.py's float32
    operations in its order (also what coordinator/gguf_blocks.py re-quantizes GGUF blocks with)."""
    f = np.empty(1, np.float32)
    u = f.view(np.uint32)
    lo, hi = np.float32(-qmax - 1), np.float32(qmax)
    for j in range(x.shape[0] // g):
        amax = np.float32(0)
        for k in range(j * g, (j + 1) * g):
            amax = max(amax, abs(x[k]))
        f[0] = amax / np.float32(qmax)
        b = (u[0] + np.uint32(0x7FFF) + ((u[0] >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        s[j] = b
        u[0] = b << np.uint32(16)
        scale = f[0]
        for k in range(j * g, (j + 1) * g):
            q[k] = np.int8(min(max(np.rint(x[k] / scale), lo), hi)) if scale > 0 else 0


@numba.njit(nogil=True, cache=True)
def _quantize_rows_bf16(w: np.ndarray, g: int, qmax: int, bits: int, q: np.ndarray, s: np.ndarray) -> None:
    """w uint16 [R, K] (bf16 bits) -> q ([R, K] int8, or [R, K / 2] uint8 packed as quant.py says
    for bits 4) and s uint16 [R, K / g] (bf16 bits)."""
    x = np.empty(w.shape[1], np.float32)
    xu = x.view(np.uint32)
    row = np.empty(w.shape[1], np.int8)
    for r in range(w.shape[0]):
        for k in range(w.shape[1]):
            xu[k] = np.uint32(w[r, k]) << np.uint32(16)  # bf16 -> float32, exact
        quantize_row(x, g, qmax, row, s[r])
        store_row(row, bits, q[r])


@numba.njit(nogil=True, cache=True)
def _quantize_rows_f32(w: np.ndarray, g: int, qmax: int, bits: int, q: np.ndarray, s: np.ndarray) -> None:
    """_quantize_rows_bf16 for float32 w [R, K]."""
    row = np.empty(w.shape[1], np.int8)
    for r in range(w.shape[0]):
        quantize_row(w[r], g, qmax, row, s[r])
        store_row(row, bits, q[r])


@numba.njit(nogil=True, cache=True)
def store_row(row: np.ndarray, bits: int, out: np.ndarray) -> None:
    """A row of codes int8 [K] as quant.py stores it: packed into uint8 [K / 2] for bits 4, else as is."""
    if bits == 4:
        for k in range(row.shape[0] // 2):
            out[k] = np.uint8(row[2 * k] + 8) | (np.uint8(row[2 * k + 1] + 8) << np.uint8(4))
    else:
        out[:] = row


def quantize_weight(w: torch.Tensor, bits: int, g: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., O, K] on the CPU (bf16 read as it is; another float dtype widened to float32 first,
    exactly, as quant.py does) -> (q stored as quant.py lays it out: uint8 [..., O, K / 2] for INT4,
    int8 [..., O, K] for INT8; scales bf16 [..., O, K / g]). g divides K; K is even for INT4; qmax
    is quant.py's QMAX[bits]."""
    *lead, k = w.shape
    rows = w.reshape(-1, k)
    n = rows.shape[0]
    q = np.empty((n, k // 2) if bits == 4 else (n, k), np.uint8 if bits == 4 else np.int8)
    s = np.empty((n, k // g), np.uint16)
    if w.dtype == torch.bfloat16:
        _quantize_rows_bf16(rows.contiguous().view(torch.int16).numpy().view(np.uint16), g, qmax, bits, q, s)
    else:
        _quantize_rows_f32(rows.float().contiguous().numpy(), g, qmax, bits, q, s)
    return torch.from_numpy(q).reshape(*lead, q.shape[-1]), torch.from_numpy(s).view(torch.bfloat16).reshape(*lead, k // g)
