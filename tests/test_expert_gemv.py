"""The fused dequantize-and-multiply kernel of hcs_hybrid decode (gpu_worker/expert_gemv_kernel.py)
against its reference, dequant_reference then a float32 matrix-vector product. Without a GPU,
Triton's interpreter runs the same kernel on the CPU in a fresh interpreter (tm.run_interpreted);
benchmarks/device_check.py runs it on CUDA."""

from __future__ import annotations

import pytest

import tiny_models as tm

pytest.importorskip("triton", reason="triton is a test dependency (pyproject's test extra)")

CHECK = r"""
import torch
from krasis.gpu_worker.dequant import dequant_reference
from krasis.gpu_worker.expert_gemv_kernel import expert_gemv
from krasis.shared.expert_store import ExpertFormat
from krasis.shared.quant import quantized

torch.manual_seed(0)
dev = "cuda" if torch.cuda.is_available() else "cpu"
for kind in ("int4", "int8"):
    # O not a multiple of the kernel's 32 rows; a group of 96 values (not a power of two) and of 128
    for O, K, group, n in ((45, 288, 96, 4), (70, 512, 128, 3)):
        fmt = ExpertFormat(kind, torch.bfloat16, group)
        parts = [quantized(fmt, torch.randn(O, K) * 0.1, "w") for _ in range(n)]
        t = {k: torch.stack([p[k] for p in parts]).to(dev) for k in parts[0]}
        rows = torch.tensor([n - 1, 0, n - 1, 1], device=dev)  # gathered, out of order, repeated
        x = torch.randn(4, K, device=dev).bfloat16()
        want = torch.bmm(dequant_reference(fmt, t, "w", rows, torch.float32), x.float().unsqueeze(-1)).squeeze(-1)
        got = expert_gemv(fmt, t, "w", rows, x)
        assert got.dtype == torch.float32 and got.shape == (4, O), got.shape
        err = float((got - want).abs().max() / want.abs().max())
        assert err < 1e-5, (kind, O, K, err)
print("ok")
"""


def test_expert_gemv_matches_reference():
    tm.run_interpreted(CHECK)
