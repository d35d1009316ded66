"""The prompt-chunk attention kernel (shared/kernels/prefill_attention_kernel.py) against the torch
path of layers.attend (F.scaled_dot_product_attention with the KV heads repeated), under Triton's
interpreter in a fresh process (benchmarks/device_check.py runs the same check compiled on a GPU):
a first chunk (t = T) and later chunks (bottom-right causal over earlier keys), GQA and not, lengths
that are no multiple of the blocks, blocks small enough that a chunk spans several of them, and
gpt-oss's sliding window and sinks."""

from __future__ import annotations

import pytest

import tiny_models as tm

CHECK = r"""
import os
import torch

dev = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
dtype = torch.bfloat16 if dev == "cuda" else torch.float32

from krasis.shared.kernels.prefill_attention_kernel import prefill_attention_triton
from krasis.shared.models.layers import _sdpa, attend

g = torch.Generator().manual_seed(0)
tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
blocks = dict(block_m=16, block_n=16, num_warps=4, num_stages=1) if dev == "cpu" else {}
# (t, T, heads, kv heads, d): a first chunk, later chunks starting inside and at the edge of a block,
# one query, MHA, and a chunk shorter than one block
for t, T, hq, hkv, d in ((37, 37, 4, 2, 32), (21, 70, 4, 1, 32), (16, 48, 2, 2, 64), (1, 33, 4, 2, 32),
                         (5, 5, 2, 1, 16), (40, 41, 4, 4, 32)):
    q = torch.randn(t, hq, d, generator=g).to(dev, dtype)
    k, v = (torch.randn(T, hkv, d, generator=g).to(dev, dtype) for _ in range(2))
    scale = d ** -0.5
    want = _sdpa(q, k, v, T - t, scale, None).float()
    got = prefill_attention_triton(q, k, v, scale, **blocks)
    assert got.shape == q.shape and got.dtype == q.dtype
    err = float((got.float() - want).abs().max())
    assert err <= tol * float(want.abs().max()), (t, T, hq, hkv, d, err)
    # gpt-oss: a sliding window (lower edge inside a key block, and one wider than the keys) and
    # sinks, against attend()'s own path for them
    sinks = torch.randn(hq, generator=g).to(dev, torch.float32)
    for window in (7, 100):
        want_w = attend(q, k, v, T - t, scale, window, sinks).float()
        got_w = prefill_attention_triton(q, k, v, scale, window, sinks, **blocks)
        err = float((got_w.float() - want_w).abs().max())
        assert err <= tol * float(want_w.abs().max()), (t, T, window, err)
    want_w = _sdpa(q, k, v, T - t, scale, 7).float()
    assert float((prefill_attention_triton(q, k, v, scale, 7, **blocks).float() - want_w).abs().max()) <= tol * float(want_w.abs().max())
    # the causal mask is the bottom right's: the last query sees every key, the first only the
    # keys up to its own position, so changing a later key must not change the first row
    k2 = k.clone()
    k2[T - t + 1 :] += 1.0
    if t > 1:
        again = prefill_attention_triton(q, k2, v, scale, **blocks)
        assert torch.equal(again[0], got[0]) and not torch.equal(again[-1], got[-1])
print("ok")
"""


def test_prefill_attention_kernel_matches_the_torch_path():
    pytest.importorskip("triton", reason="triton is a test dependency (pyproject's test extra)")
    tm.run_interpreted(CHECK)
