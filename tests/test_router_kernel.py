"""The router's Triton kernels (shared/kernels/router_kernel.py) against layers.softmax_topk_reference,
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

# router_topk: the product and the top-k in one kernel. Inputs on a grid where every product and
# partial sum is exact in float32 and every logit a bf16 value (checked), so the kernel's logits are
# the reference's whatever the order of the sum (and no rounding tie, which Triton's interpreter
# breaks otherwise than CUDA): ids must be equal, not just close, equal logits taken lowest index
# first (a stable sort). Qwen3-30B-A3B's router (128 x 2048, top 8), Qwen3-Next's 512 experts top
# 10, an odd count and a narrow row; 1 to 8 tokens.
from krasis.shared.kernels.router_kernel import FUSED_MAX_TOKENS, fits, router_topk_triton
import torch.nn.functional as F


def reference(x, r, k, renorm):
    logits = x.float() @ r.float().T
    assert torch.equal(logits, logits.to(torch.bfloat16).float())
    p = torch.softmax(logits, -1)
    ids = torch.sort(p, dim=-1, descending=True, stable=True).indices[:, :k]
    w = p.gather(1, ids)
    return ids, w / w.sum(-1, keepdim=True) if renorm else w


for m, e, hidden, k in ((1, 128, 2048, 8), (8, 128, 2048, 8), (3, 512, 2048, 10), (2, 60, 96, 4), (5, 64, 1000, 1)):
    # about 48 nonzero inputs a token: logits multiples of 2^-9 below 1/2 in size, so bf16 holds them
    x = torch.randint(-2, 3, (m, hidden), generator=g) * 2.0**-6 * (torch.rand(m, hidden, generator=g) < 48 / hidden)
    x = x.to(torch.bfloat16)
    r = (torch.randint(-8, 9, (e, hidden), generator=g) / 8).to(torch.bfloat16)
    assert fits(x, r) == (m <= FUSED_MAX_TOKENS)  # the kernel serves any number, fused for few (timings)
    for renorm in (True, False):
        ids, w = router_topk_triton(x, r, k, renorm)
        want_ids, want_w = reference(x, r, k, renorm)
        assert torch.equal(ids, want_ids), (m, e, hidden, k, renorm, ids, want_ids)
        torch.testing.assert_close(w, want_w, rtol=1e-6, atol=1e-7)
        # and again: the count the last program reset lets the next call (a graph's replay) run
        assert torch.equal(router_topk_triton(x, r, k, renorm)[0], ids)
# with the residual add and the post-attention norm before the product: s = h + a and x = RMSNorm(s)
# as add_rms_norm gives them, then the route of that x. Rows of s all +-1 and eps 0 make the norm's
# scale exactly 1, so x = weight * s is on the grid above and the route exact again.
from krasis.shared.models.layers import add_rms_norm
for m, e, hidden, k in ((1, 128, 2048, 8), (4, 60, 96, 4)):
    sign = (torch.randint(0, 2, (m, hidden), generator=g) * 2 - 1).to(torch.bfloat16)
    h, a = sign * 0.75, sign * 0.25
    ln = (torch.randint(-2, 3, (hidden,), generator=g) * 2.0**-6 * (torch.rand(hidden, generator=g) < 48 / hidden)).to(torch.bfloat16)
    r = (torch.randint(-8, 9, (e, hidden), generator=g) / 8).to(torch.bfloat16)
    want_s, want_x = add_rms_norm(h, a, ln, 0.0)
    assert fits(h, r, ln) == (m <= FUSED_MAX_TOKENS) and torch.equal(want_s.abs(), torch.ones_like(want_s))
    s, x, ids, w = router_topk_triton(h, r, k, True, norm=(a, ln, 0.0))
    assert torch.equal(s, want_s) and torch.equal(x, want_x)
    want_ids, want_w = reference(want_x, r, k, True)
    assert torch.equal(ids, want_ids), (ids, want_ids)
    torch.testing.assert_close(w, want_w, rtol=1e-6, atol=1e-7)
# a row of tokens inside a wider activation; more tokens or a float32 router are not fused
x = torch.randn(2, 300, generator=g).to(torch.bfloat16)[:, :256]
r = (torch.randn(16, 256, generator=g) * 0.05).to(torch.bfloat16)  # logits of about unit size
assert fits(x, r) and not fits(torch.zeros(FUSED_MAX_TOKENS + 1, 256, dtype=torch.bfloat16), r) and not fits(x, r.float())
ids, w = router_topk_triton(x, r, 2, True)
want_ids, want_w = softmax_topk_reference(F.linear(x.float(), r.float()).to(torch.bfloat16), 2, True)
assert torch.equal(ids, want_ids)
torch.testing.assert_close(w, want_w, rtol=1e-2, atol=0)  # a logit's last bf16 bit may differ
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
