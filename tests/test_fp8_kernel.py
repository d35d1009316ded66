"""The FP8 KV encoding's Triton kernel (gpu_worker/fp8_kernel.py) against
kv_cache.fp8_quantize_reference, bit for bit: under Triton's interpreter in a fresh process (as
tests/test_norm_rope.py does), or, run as a script on a CUDA machine (benchmarks/device_check.py),
compiled on the GPU, where the e4m3 cast is the hardware's."""

from __future__ import annotations

import pytest

import tiny_models as tm

CHECK = tm.E4M3_RNE + r"""
import os
import torch

dev = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"

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

# A decode step's rows into three sequences' caches (their own allocations, of other capacities):
# two parts of one shape (K and V: one launch) and then, in a second call, two of different widths
# (MLA's latent and rope key: a launch each). Each sequence's rows land at its position in each
# part, encoded as the reference does (or cast, for a bf16 cache); every other row, and a stored
# part written by neither (the table's third), untouched.
from krasis.gpu_worker.cache_rows import device_table, offsets
from krasis.gpu_worker.fp8_kernel import write_rows_triton

for fp8 in (True, False):
    for n in (1, 2):
        for widths in ((96, 96), (96, 32)):
            starts, caps = [0, 37, 5], [64, 128, 70]
            kind = torch.float8_e4m3fn if fp8 else torch.bfloat16
            ts = [(torch.randn(3 * n, 2, w, generator=g) * 3).bfloat16().to(dev) for w in widths]
            caches = [[(torch.zeros(c, 2, w, dtype=kind, device=dev), torch.full((c, 2, 1), -1.0, device=dev) if fp8 else None)
                       for w in widths] for c in caps]
            other = [torch.zeros(c, 1, 8, device=dev) for c in caps]
            table = device_table(offsets([[*parts, (o, None)] for parts, o in zip(caches, other)], starts), ts[0].device)
            write_rows_triton(ts, kind, table, 7)
            assert not any(o.any() for o in other)
            for b, (parts, st) in enumerate(zip(caches, starts)):
                for t, (q, sc) in zip(ts, parts):
                    mine = t[b * n : (b + 1) * n]
                    if fp8:
                        wq, ws = fp8_quantize_reference(mine)
                        assert torch.equal(q[st : st + n].view(torch.uint8), wq.view(torch.uint8)) and torch.equal(sc[st : st + n], ws), (b, n)
                        assert bool((sc[:st] == -1).all() and (sc[st + n :] == -1).all())
                    else:
                        assert torch.equal(q[st : st + n], mine), (b, n)
                    rest = torch.cat([q[:st], q[st + n :]]).view(torch.uint8) if fp8 else torch.cat([q[:st], q[st + n :]])
                    assert not rest.any(), (b, n, widths)
print("ok")
"""


def test_triton_fp8_encoding_matches_reference():
    pytest.importorskip("triton", reason="triton is a test dependency (pyproject's test extra)")
    tm.run_interpreted(CHECK)
