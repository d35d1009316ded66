"""The router's Triton kernel (shared/kernels/router_kernel.py) against layers.softmax_topk_reference,
under Triton's interpreter in a fresh process (as tests/test_norm_rope.py does); on CPU the
dispatch runs the reference without importing the kernel."""

from __future__ import annotations

import sys

import pytest
import torch

import tiny_models as tm

CHECK = r"""
import torch
from krasis.shared.kernels.router_kernel import softmax_topk_triton
from krasis.shared.models.layers import softmax_topk_reference

g = torch.Generator().manual_seed(0)
# Qwen3's 128 experts top 8, DeepSeek-V2-Lite's 64 top 6, an odd count, one token and a batch,
# bf16 logits as the router's linear gives them, float32 too, renormalised or not
for m, e, k in ((1, 128, 8), (5, 64, 6), (3, 60, 4), (2, 256, 1)):
    for dtype in (torch.bfloat16, torch.float32):
        x = (torch.randn(m, e, generator=g) * 2).to(dtype)
        for renorm in (True, False):
            ids, w = softmax_topk_triton(x, k, renorm)
            want_ids, want_w = softmax_topk_reference(x, k, renorm)
            assert ids.dtype == torch.int64 and w.dtype == torch.float32 and ids.shape == (m, k)
            assert torch.equal(ids, want_ids), (m, e, k, dtype, renorm, ids, want_ids)
            torch.testing.assert_close(w, want_w, rtol=1e-6, atol=1e-7)

# equal probabilities: the lower index first, as the order of distinct values is
x = torch.zeros(1, 16)
x[0, 3] = x[0, 9] = 1.0
ids, w = softmax_topk_triton(x, 3, False)
assert ids.tolist() == [[3, 9, 0]] and w[0, 0] == w[0, 1], ids
# a strided view (the router's rows inside a wider activation)
x = torch.randn(4, 200, generator=g)[:, 10:138]
ids, w = softmax_topk_triton(x, 8, True)
assert torch.equal(ids, softmax_topk_reference(x, 8, True)[0])
print("ok")
"""


def test_triton_router_matches_reference():
    pytest.importorskip("triton", reason="triton is a test dependency (pyproject's test extra)")
    tm.run_interpreted(CHECK)


def test_cpu_dispatch_is_the_reference(monkeypatch):
    monkeypatch.setitem(sys.modules, "krasis.shared.kernels.router_kernel", None)  # importing it would raise
    from krasis.shared.models.layers import softmax_topk, softmax_topk_reference

    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1)).bfloat16()
    for a, b in zip(softmax_topk(x, 6, True), softmax_topk_reference(x, 6, True)):
        assert torch.equal(a, b)
