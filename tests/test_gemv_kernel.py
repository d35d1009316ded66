"""The decode GEMV (shared/kernels/gemv_kernel.py) against the float32 product, under Triton's
interpreter in a fresh process (as tests/test_norm_rope.py does), in bfloat16 and float16. Integer
inputs keep every sum exact, so the products must be equal; with the input norm in the kernel, the
same. INT8 rows with their scales (--attn-bits 8): the dequantized weights must be QuantLinear's,
rounding included."""

from __future__ import annotations

import pytest

import tiny_models as tm

CHECK = r"""
import torch
from krasis.shared.kernels import gemv_kernel
from krasis.shared.kernels.gemv_kernel import INT8_MAX_TOKENS, MAX_TOKENS, ROW_MAX, fits, gemv, tiles


g = torch.Generator().manual_seed(0)
# one token and a batch; rows that fill a program's BN, that do not, and fewer than BN; widths a
# whole number of BK, not, and narrower than one; a row a program (tiles(k)), several, and a row in
# blocks (256: the loop)
for (m, n, k), dtype in zip(((1, 40, 512), (3, 20, 300), (4, 5, 33), (2, 16, 1000)),
                          (torch.bfloat16, torch.float16, torch.bfloat16, torch.float16)):
    for tiling in (None, (8192, 4), (256, 2)):
        wide = torch.randint(-2, 3, (m, k + 7), generator=g).to(dtype)
        x = wide[:, 3:3 + k]  # rows inside a wider activation (stride k + 7)
        w = torch.randint(-2, 3, (n, k), generator=g).to(dtype)
        assert fits(x, w) == (m <= MAX_TOKENS)
        y = gemv(x, w, tiling)
        want = (x.float() @ w.float().T).to(dtype)
        assert y.dtype == dtype and torch.equal(y, want), (m, n, k, tiling, (y.float() - want.float()).abs().max())
# with the input norm in the kernel (layers.norm_linear): row i all +-2^i and eps 0 make its scale
# exactly 2^-i, so the normalised row is weight * (+-1), integers again, and the product exact
from krasis.shared.models.layers import rms_norm
for m, n, k in ((1, 40, 512), (3, 20, 300)):
    sign = (torch.randint(0, 2, (m, k), generator=g) * 2 - 1).half()
    x = sign * 2.0 ** torch.arange(m).half()[:, None]
    ln = torch.randint(-2, 3, (k,), generator=g).half()
    w = torch.randint(-2, 3, (n, k), generator=g).half()
    assert fits(x, w, ln) == (m <= MAX_TOKENS)
    xn = rms_norm(x, ln, 0.0)
    assert torch.equal(xn, ln * sign)
    for tiling in (None, (256, 2)):  # the row whole, and in blocks
        assert torch.equal(gemv(x, w, tiling, norm=(ln, 0.0)), (xn.float() @ w.float().T).half())
# INT8 rows (QuantLinear): with unit rows for x, each output is one dequantized weight, so any
# scale checks the kernel's rounding of q * scale against the reference's (in float16: Triton
# 3.9's interpreter truncates float32 to bfloat16, where CUDA rounds to nearest even); integer x with
# power-of-two scales keeps every weight exact and the sums exact and small (the interpreter's
# truncation never rounds them), in both dtypes
from krasis.shared.quant import QuantLinear
for (m, n, k), dtype in zip(((2, 20, 300), (INT8_MAX_TOKENS, 40, 512)), (torch.bfloat16, torch.float16)):
    gemv_kernel.ENABLED = False  # INT8 rows take the kernel whatever 16-bit weights do
    ql = QuantLinear.quantize(torch.randn(n, k, generator=g))
    unit = torch.zeros(m, k, dtype=dtype)
    cols = torch.randint(0, k, (m,), generator=g)
    unit[torch.arange(m), cols] = 1
    assert fits(unit, ql.q, scale=ql.scale)
    if dtype == torch.float16:
        assert torch.equal(gemv(unit, ql.q, scale=ql.scale), ql.dequantize(dtype).T[cols])
    pow2 = QuantLinear(torch.randint(-3, 4, (n, k), generator=g).to(torch.int8),
                       (2.0 ** -torch.randint(6, 9, (n, 1), generator=g)).to(torch.bfloat16))
    x = torch.randint(-1, 2, (m, k), generator=g).to(dtype)
    want = (x.float() @ pow2.dequantize(dtype).float().T).to(dtype)
    for tiling in (None, (8192, 4), (256, 2)):
        assert torch.equal(gemv(x, pow2.q, tiling, scale=pow2.scale), want), (m, n, k, tiling)
    # the input norm too, its rows made as above so that the normalised rows are integers
    sign = (torch.randint(0, 2, (m, k), generator=g) * 2 - 1).to(dtype)
    ln = torch.randint(-2, 3, (k,), generator=g).to(dtype)
    xn = sign * 2.0 ** torch.arange(m).to(dtype)[:, None]
    for tiling in (None, (256, 2)):
        assert torch.equal(gemv(xn, pow2.q, tiling, norm=(ln, 0.0), scale=pow2.scale),
                           ((ln * sign).float() @ pow2.dequantize(dtype).float().T).to(dtype))
    gemv_kernel.ENABLED = True
one, q8, s8 = torch.zeros(1, 8).half(), torch.zeros(4, 8, dtype=torch.int8), torch.ones(4, 1).half()
assert fits(torch.zeros(INT8_MAX_TOKENS, 8).half(), q8, scale=s8)
assert not fits(torch.zeros(INT8_MAX_TOKENS + 1, 8).half(), q8, scale=s8)
assert not fits(one, q8)  # INT8 needs its scales
assert not fits(one, q8, scale=torch.ones(4))
assert fits(one, torch.zeros(4, 8).half())
assert not fits(torch.zeros(MAX_TOKENS + 1, 8).half(), torch.zeros(4, 8).half())
assert not fits(one, torch.zeros(4, 8).half().t().contiguous().t())  # a transposed view
assert not fits(torch.zeros(1, 8), torch.zeros(4, 8))  # float32: cuBLAS's
gemv_kernel.ENABLED = False  # KRASIS_GEMV=0
assert not fits(one, torch.zeros(4, 8).half()) and fits(one, q8, scale=s8)
# one row a program whole up to ROW_MAX (the one-shot path), blocks of it beyond (the loop)
assert all(tiles(k)[0] >= k for k in (33, 2048, 4096, ROW_MAX)) and tiles(4 * ROW_MAX)[0] == ROW_MAX
print("ok")
"""


def test_gemv_matches_the_float32_product():
    pytest.importorskip("triton", reason="triton is a test dependency (pyproject's test extra)")
    tm.run_interpreted(CHECK)
