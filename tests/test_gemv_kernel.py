"""The decode GEMV (shared/kernels/gemv_kernel.py) against the float32 product, under Triton's
interpreter in a fresh process (as tests/test_norm_rope.py does), in bfloat16 and float16. Integer
inputs keep every sum exact, so the products must be equal; with the input norm in the kernel, the
same."""

from __future__ import annotations

import pytest

import tiny_models as tm

CHECK = r"""
import torch
from krasis.shared.kernels import gemv_kernel
from krasis.shared.kernels.gemv_kernel import MAX_TOKENS, fits, gemv

gemv_kernel.ENABLED = True  # off by default (KRASIS_GEMV=1) until measured on the device

g = torch.Generator().manual_seed(0)
# one token and a batch; rows that fill a program's BN, that do not, and fewer than BN; widths a
# whole number of BK, not, and narrower than one; the sizes device_check times
for (m, n, k), dtype in zip(((1, 64, 512), (3, 100, 300), (MAX_TOKENS, 5, 33), (2, 48, 1000)),
                          (torch.bfloat16, torch.float16, torch.bfloat16, torch.float16)):
    for tiles in ((8192, 4), (1024, 4), (256, 2)):
        wide = torch.randint(-2, 3, (m, k + 7), generator=g).to(dtype)
        x = wide[:, 3:3 + k]  # rows inside a wider activation (stride k + 7)
        w = torch.randint(-2, 3, (n, k), generator=g).to(dtype)
        assert fits(x, w)
        y = gemv(x, w, tiles)
        want = (x.float() @ w.float().T).to(dtype)
        assert y.dtype == dtype and torch.equal(y, want), (m, n, k, tiles, (y.float() - want.float()).abs().max())
# with the input norm in the kernel (layers.norm_linear): row i all +-2^i and eps 0 make its scale
# exactly 2^-i, so the normalised row is weight * (+-1), integers again, and the product exact
from krasis.shared.models.layers import rms_norm
for m, n, k in ((1, 64, 512), (3, 100, 300)):
    sign = (torch.randint(0, 2, (m, k), generator=g) * 2 - 1).half()
    x = sign * 2.0 ** torch.arange(m).half()[:, None]
    ln = torch.randint(-2, 3, (k,), generator=g).half()
    w = torch.randint(-2, 3, (n, k), generator=g).half()
    assert fits(x, w, ln)
    xn = rms_norm(x, ln, 0.0)
    assert torch.equal(xn, ln * sign)
    assert torch.equal(gemv(x, w, norm=(ln, 0.0)), (xn.float() @ w.float().T).half())
assert not fits(torch.zeros(MAX_TOKENS + 1, 8).half(), torch.zeros(4, 8).half())
assert not fits(torch.zeros(2, 8).half(), torch.zeros(4, 8).half().t().contiguous().t())  # a transposed view
assert not fits(torch.zeros(2, 8), torch.zeros(4, 8))  # float32: cuBLAS's
gemv_kernel.ENABLED = False
assert not fits(torch.zeros(2, 8).half(), torch.zeros(4, 8).half())
print("ok")
"""


def test_gemv_matches_the_float32_product():
    pytest.importorskip("triton", reason="triton is a test dependency (pyproject's test extra)")
    tm.run_interpreted(CHECK)
