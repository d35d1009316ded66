"""The experts' activation with its mask (gpu_worker/moe_gpu.py: masked_act): the one-pass Triton
kernel (act_kernel.py) against its torch reference, under Triton's interpreter in a fresh process
(benchmarks/device_check.py runs the same check compiled on a GPU)."""

from __future__ import annotations

import pytest

import tiny_models as tm

CHECK = r"""
import os
import torch

dev = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"

from krasis.gpu_worker.act_kernel import masked_silu_mul_triton
from krasis.gpu_worker.moe_gpu import masked_act_reference

g = torch.Generator().manual_seed(0)
# (rows, I): I below, at and past the kernel's block; one row; no rows
for R, I in ((6, 96), (1, 1024), (5, 1030), (0, 64)):
    for dtype in (torch.bfloat16, torch.float16):
        gu = (torch.randn(R, 2 * I, generator=g) * 4).to(dtype)
        keep = torch.rand(R, generator=g) > 0.3
        if R:
            keep[0] = True
        if R > 1:
            gu[-1, :3] = float("inf")  # a pair outside the block may have overflowed: masked, it is 0
            keep[-1] = False
        want = masked_act_reference(gu.float(), "silu", keep)
        got = masked_silu_mul_triton(gu.to(dev), keep.to(dev)).cpu()
        assert got.shape == (R, I) and got.dtype == dtype
        assert torch.isfinite(got).all()
        # within the output dtype's rounding of the float32 reference (the SiLU is rounded once
        # more before the product, as the torch kernels do)
        tol = 2 * torch.finfo(dtype).eps * want.abs() + 1e-6
        assert ((got.float() - want).abs() <= tol).all(), (R, I, dtype, float((got.float() - want).abs().max()))
        if R:
            assert (got[~keep] == 0).all() and (got[keep] != 0).any()
        # the pairs' weights as the mask (moe_gpu.pairs_in_kernels): zero weight, zero row
        w = torch.where(keep, torch.rand(R, generator=g) + 0.1, 0.0)
        assert torch.equal(masked_silu_mul_triton(gu.to(dev), w.to(dev)).cpu(), got)
        assert torch.equal(masked_act_reference(gu.float(), "silu", w), want)
print("ok")
"""


def test_triton_masked_silu_matches_reference():
    pytest.importorskip("triton", reason="triton is a test dependency (pyproject's test extra)")
    tm.run_interpreted(CHECK)
