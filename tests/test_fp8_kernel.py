"""The FP8 KV encoding's Triton kernel (gpu_worker/fp8_kernel.py) against
kv_cache.fp8_quantize_reference, bit for bit: under Triton's interpreter in a fresh process (as
tests/test_norm_rope.py does), or, run as a script on a CUDA machine (benchmarks/device_check.py),
compiled on the GPU, where the e4m3 cast is the hardware's."""

from __future__ import annotations

import pytest

import tiny_models as tm

CHECK = r"""
import os
import numpy as np
import torch
import triton.language as tl

dev = "cpu"
if os.environ.get("TRITON_INTERPRET") == "1":
    # The interpreter's own float32 -> e4m3 conversion does not round as CUDA's cvt.rn does (to
    # nearest even, as torch's cast does, which stands in for it here).
    from triton.runtime import interpreter

    _cast = interpreter.InterpreterBuilder.create_fp_to_fp
    def _cast_rne(self, src, dst_type, rounding_mode):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.float8e4nv:
            a = torch.from_numpy(np.array(src.data, dtype=np.float32)).to(torch.float8_e4m3fn)
            return interpreter.TensorHandle(a.view(torch.uint8).numpy(), tl.float8e4nv)
        return _cast(self, src, dst_type, rounding_mode)
    interpreter.InterpreterBuilder.create_fp_to_fp = _cast_rne
else:
    dev = "cuda"

from krasis.gpu_worker.fp8_kernel import fp8_quantize_triton
from krasis.gpu_worker.kv_cache import fp8_quantize_reference

g = torch.Generator().manual_seed(0)
# GQA keys [T, 4, 128] in bf16, MLA's latent [T, 1, 512] and rope key [T, 1, 64], float32, an odd
# width, a row of zeros (the clamped scale), a non-contiguous view
cases = [torch.randn(3, 4, 128, generator=g).bfloat16() * 5, torch.randn(2, 1, 512, generator=g),
         torch.randn(5, 1, 64, generator=g) * 1e-3, torch.randn(2, 3, 100, generator=g).half()]
z = torch.randn(2, 2, 128, generator=g).bfloat16()
z[1, 0] = 0
cases += [z, torch.randn(4, 8, 128, generator=g).bfloat16()[:, ::2]]
for t in cases:
    t = t.to(dev)
    q, s = fp8_quantize_triton(t)
    wq, ws = fp8_quantize_reference(t)
    assert q.dtype == wq.dtype and q.shape == wq.shape and s.shape == ws.shape, (q.shape, wq.shape, s.shape, ws.shape)
    assert torch.equal(s, ws), (t.shape, (s - ws).abs().max())
    assert torch.equal(q.view(torch.uint8), wq.view(torch.uint8)), (t.shape, (q.float() - wq.float()).abs().max())
    # into rows of a larger buffer (a cache's), its other rows untouched
    bq = torch.zeros(t.shape[0] + 3, *t.shape[1:], dtype=torch.float8_e4m3fn, device=dev)
    bs = torch.full((t.shape[0] + 3, *t.shape[1:-1], 1), -1.0, device=dev)
    assert fp8_quantize_triton(t, out=(bq[2:-1], bs[2:-1]))[0].data_ptr() == bq[2:-1].data_ptr()
    assert torch.equal(bq[2:-1].view(torch.uint8), wq.view(torch.uint8)) and torch.equal(bs[2:-1], ws)
    assert not bq[:2].view(torch.uint8).any() and not bq[-1:].view(torch.uint8).any() and bool((bs[:2] == -1).all() and (bs[-1:] == -1).all())
print("ok")
"""


def test_triton_fp8_encoding_matches_reference():
    pytest.importorskip("triton", reason="triton is a test dependency (pyproject's test extra)")
    tm.run_interpreted(CHECK)
