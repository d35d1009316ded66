"""shared/gguf_quant.py against its reference, the float path (gguf.quants.dequantize, then
quant.quantize): the same bytes for every block type, both widths and group sizes below, at and
above the block size; and the blocks it keeps are exactly the file's weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from krasis.shared import gguf_quant as gq  # noqa: E402
from krasis.shared.quant import dequantize_q, unpack_int4  # noqa: E402

T = gguf.GGMLQuantizationType


def random_blocks(qtype: str, rows: int, k: int, rng) -> np.ndarray:
    """Any valid blocks: random codes, and scales over their whole finite range (fp16 d of both
    signs, subnormal and zero; E8M0 from its subnormal end to 2^121)."""
    size = gq.BLOCK_BYTES[qtype]
    raw = rng.integers(0, 256, (rows, k // gq.QK, size), dtype=np.uint8)
    if qtype == "MXFP4":
        raw[..., 0] = rng.integers(0, 250, raw.shape[:-1])
    else:
        d = raw[..., :2].copy().view(np.uint16)
        d[(d & 0x7C00) == 0x7C00] &= 0xBFFF  # no inf / NaN: exponent 31 -> 15
        d[..., ::7, :] &= 0x8000  # some zero scales (+0 and -0)
        raw[..., :2] = d.view(np.uint8)
    return raw.reshape(rows, -1)


def realistic_blocks(qtype: str, rows: int, k: int, rng) -> np.ndarray:
    """Blocks as llama.cpp's quantizers make them from Gaussian weights (Q4_0: the largest weight
    at code -8; Q8_0: at +-127), with outlier rows."""
    w = (rng.standard_normal((rows, k)) * 0.02).astype(np.float32)
    w[::5] *= 50
    return gguf.quants.quantize(w, getattr(T, qtype))


def same(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> bool:
    return torch.equal(a[0], b[0]) and torch.equal(a[1].view(torch.int16), b[1].view(torch.int16))


@pytest.mark.parametrize("qtype", gq.FAST_TYPES)
def test_same_bytes_as_the_float_path(qtype):
    rng = np.random.default_rng(0)
    for make in (random_blocks, realistic_blocks):
        raw = make(qtype, 96, 256, rng)
        for bits in (4, 8):
            for group in (16, 32, 64, 256):
                got = gq.convert(raw.reshape(3, 32, -1), qtype, bits, group)
                want = gq.reference(raw, qtype, bits, group)
                assert got[0].shape == (3, 32, want[0].shape[-1]) and same(tuple(t.flatten(0, 1) for t in got), want), \
                    (make.__name__, bits, group)


@pytest.mark.parametrize("qtype, bits", [("Q4_0", 4), ("Q8_0", 8)])
def test_kept_blocks_are_the_files_weights(qtype, bits):
    """At group 32, blocks whose largest code is qmax keep their codes: where d is a bf16 value
    the cache's weights are exactly the file's (with either sign of d)."""
    rng = np.random.default_rng(1)
    raw = random_blocks(qtype, 64, 128, rng).reshape(64, 4, -1)
    qmax = 7 if bits == 4 else 127
    d = rng.choice([1, -1], (64, 4)) * rng.uniform(1e-3, 1, (64, 4))
    d16 = d.astype(np.float16)
    d16 = (d16.view(np.uint16) & 0xFFF8).view(np.float16)  # 8 significant bits: exact in bf16
    raw[..., :2] = d16[..., None].view(np.uint8)
    if bits == 4:
        raw[..., 2] = (raw[..., 2] & 0xF0) | (qmax + 8)  # code 7 at position 0, nothing at -8
        raw[..., 3:] = np.where((raw[..., 3:] & 0x0F) == 0, raw[..., 3:] | 1, raw[..., 3:])
        raw[..., 3:] = np.where((raw[..., 3:] >> 4) == 0, raw[..., 3:] | 0x10, raw[..., 3:])
        raw[..., 2] = np.where((raw[..., 2] >> 4) == 0, raw[..., 2] | 0x10, raw[..., 2])
    else:
        codes = raw[..., 2:].view(np.int8)
        codes[codes == -128] = 0
        codes[..., 0] = -qmax
    raw = raw.reshape(64, -1)
    q, s = gq.convert(raw, qtype, bits, 32)
    weights = dequantize_q(unpack_int4(q) if bits == 4 else q, s)
    file_weights = torch.from_numpy(gguf.quants.dequantize(raw, getattr(T, qtype)))
    assert torch.equal(weights, file_weights)
    assert same((q, s), gq.reference(raw, qtype, bits, 32))
