"""shared/gguf_quant.py against its reference, the float path (gguf.quants.dequantize, then
quant.quantize): the same bytes wherever it re-quantizes (every block type, both widths, groups
below, at and above the block size); where it keeps blocks, the file's weights, and the float
path's bytes on the blocks the float path keeps too."""

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


def file_weights(raw: np.ndarray, qtype: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(gguf.quants.dequantize(raw, getattr(T, qtype)), np.float32))


def cache_weights(qs: tuple[torch.Tensor, torch.Tensor], bits: int) -> torch.Tensor:
    return dequantize_q(unpack_int4(qs[0]) if bits == 4 else qs[0], qs[1])


@pytest.mark.parametrize("qtype", gq.FAST_TYPES)
def test_requantized_blocks_are_the_float_paths_bytes(qtype):
    rng = np.random.default_rng(0)
    for make in (random_blocks, realistic_blocks):
        raw = make(qtype, 96, 256, rng)
        for bits in (4, 8):
            for group in (16, 32, 64, 256):
                if gq.keeps_blocks(qtype, bits, group):
                    continue
                got = gq.convert(raw.reshape(3, 32, -1), qtype, bits, group)
                want = gq.reference(raw, qtype, bits, group)
                assert got[0].shape == (3, 32, want[0].shape[-1]) and same(tuple(t.flatten(0, 1) for t in got), want), \
                    (make.__name__, bits, group)


@pytest.mark.parametrize("qtype, bits", [("Q4_0", 4), ("Q8_0", 8)])
def test_kept_blocks_are_the_files_weights(qtype, bits):
    """At group 32, Q4_0 into INT4 and Q8_0 into INT8 keep every block: the cache's weights are
    the file's (exactly where d is a bf16 value, else within bf16's rounding of d), and blocks
    that the float path keeps too (largest code qmax) are its bytes."""
    assert gq.keeps_blocks(qtype, bits, 32) and not gq.keeps_blocks(qtype, bits, 64)
    rng = np.random.default_rng(1)
    qmax = 7 if bits == 4 else 127
    for make in (random_blocks, realistic_blocks):
        raw = make(qtype, 64, 256, rng)
        got = gq.convert(raw, qtype, bits, 32)
        exact = file_weights(raw, qtype)
        assert torch.allclose(cache_weights(got, bits), exact, rtol=2**-8, atol=0)
        blocks = raw.reshape(64, 8, -1).copy()
        d = blocks[..., :2].copy().view(np.uint16)
        blocks[..., :2] = (d & 0xFFE0).view(np.uint8)  # 6 significant bits at most: bf16 values, subnormals too
        raw = blocks.reshape(64, -1)
        got = gq.convert(raw, qtype, bits, 32)
        assert torch.equal(cache_weights(got, bits), file_weights(raw, qtype))
        want = gq.reference(raw, qtype, bits, 32)
        codes = unpack_int4(want[0]) if bits == 4 else want[0]
        mine = unpack_int4(got[0]) if bits == 4 else got[0]
        blocks = file_weights(raw, qtype).reshape(64, 8, 32)
        d = torch.from_numpy(raw.reshape(64, 8, -1)[..., :2].copy().view(np.float16).astype(np.float32))[..., 0]
        file_codes = blocks / d[..., None]
        scheme_keeps = (d != 0) & (file_codes.abs().amax(-1) == qmax)  # the file's codes reach qmax
        negated_min_code = (d < 0) & (file_codes == -qmax - 1).any(-1)
        assert torch.equal(got[1].float() < 0, negated_min_code)
        assert negated_min_code.any() or (make is realistic_blocks and qtype == "Q8_0")  # whose d is never negative
        assert scheme_keeps.any() or (make is realistic_blocks and qtype == "Q4_0")  # llama.cpp puts -8 in every block
        assert torch.equal(mine.reshape(64, 8, 32)[scheme_keeps], codes.reshape(64, 8, 32)[scheme_keeps])
        assert torch.equal(got[1].view(torch.int16)[scheme_keeps], want[1].view(torch.int16)[scheme_keeps])
