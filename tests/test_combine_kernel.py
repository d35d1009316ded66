"""The MoE's combine (gpu_worker/moe_gpu.py: combine_pairs), also adding a decode layer's residual:
the one-pass Triton kernel (combine_kernel.py) against its torch reference, under Triton's interpreter in a fresh process
(benchmarks/device_check.py runs the same check compiled on a GPU)."""

from __future__ import annotations

import pytest

import tiny_models as tm

CHECK = r"""
import os
import torch

dev = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"

from krasis.gpu_worker.combine_kernel import combine_pairs_triton
from krasis.gpu_worker.moe_gpu import combine_pairs_reference

g = torch.Generator().manual_seed(0)
# (tokens, k, hidden): hidden below, at and past the kernel's block; one token; k of 1, 2 and 8
for T, k, H in ((5, 8, 96), (1, 2, 1024), (7, 1, 1030), (3, 8, 2051)):
    for dtype in (torch.bfloat16, torch.float32):
        y = (torch.randn(T * k, H, generator=g) * 3).to(dtype).to(dev)
        inv = torch.randperm(T * k, generator=g).to(dev)
        w = torch.rand(T * k, generator=g).to(dev)
        w[::3] = 0  # pairs outside the block weigh nothing
        start = torch.randn(T, H, generator=g).to(dev)
        want, got = start.clone(), start.clone()
        combine_pairs_reference(y, inv, w, want)
        combine_pairs_triton(y, inv, w, got)
        err = float((got - want).abs().max())
        assert err <= 1e-5 * float(want.abs().max()), (T, k, H, dtype, err)
        assert not torch.equal(want, start)
        # y in token order already (a decode step's pairs), the sum written over what out held
        want, got = start.clone(), start.clone()
        combine_pairs_reference(y, None, w, want, add=False)
        combine_pairs_triton(y, None, w, got, add=False)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (T, k, H, dtype)
        ordered = start.clone()
        combine_pairs_reference(y, torch.arange(T * k).to(dev), w, ordered)
        assert torch.allclose(want, ordered - start, rtol=1e-5, atol=1e-5)
        # a decode layer's sum added to the residual stream in its 16 bits, rounded as
        # `residual + sum.to(dtype)` rounds it (float16 under the interpreter)
        if dtype == torch.bfloat16:
            half = dtype if dev == "cuda" else torch.float16
            res = start.to(half)
            added = torch.empty_like(res)
            combine_pairs_triton(y, None, w, added, residual=res)
            assert torch.equal(added, res + got.to(half)), (T, k, H)  # got: this kernel's float32 sum
            again = torch.empty_like(res)
            combine_pairs_reference(y, None, w, again, residual=res)
            # the reference's float32 sum differs from the kernel's in its last bits (another order),
            # so its rounding to 16 bits may differ by a unit in the last place of the sum, and the
            # sum with the residual by one of its own (bfloat16 keeps 8 significant bits)
            ulp = 2.0 ** (-7 if half == torch.bfloat16 else -10)
            tol = ulp * (got.abs() + again.float().abs()) + 1e-6
            assert ((added.float() - again.float()).abs() <= tol).all(), (T, k, H)
print("ok")
"""


def test_triton_combine_matches_reference():
    pytest.importorskip("triton", reason="triton is a test dependency (pyproject's test extra)")
    tm.run_interpreted(CHECK)
