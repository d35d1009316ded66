"""RMSNorm and rotary Triton kernels (shared/kernels/norm_rope_kernel.py) against the torch code they
replace on CUDA (layers.rms_norm_reference, Rotary.rotate_half_reference), roundings included, under
Triton's interpreter (TRITON_INTERPRET, set before triton is first imported: the check runs in a
fresh interpreter, as tests/test_dequant.py does), the residual add and norm in one pass and the
fused q/k norm and rotary against the references one after the other; and the dispatch of
layers.rms_norm, add_rms_norm, Rotary.rotate_half and qk_norm_rope off CUDA, which must not import
the kernels' module."""

from __future__ import annotations

import sys

import pytest
import torch

import tiny_models as tm

CHECK = r"""
import numpy as np
import torch
import triton.language as tl
from triton.runtime import interpreter

# The interpreter's float32 -> bfloat16 cast truncates; CUDA's (cvt.rn) rounds to nearest even, as
# torch's does. Without this the roundings under test would differ from both.
_cast = interpreter.InterpreterBuilder.cast_impl
def _cast_rne(self, src, dst_type):
    if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
        a = np.array(src.data, dtype=np.float32)
        bits = torch.from_numpy(a).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return interpreter.TensorHandle(bits.reshape(a.shape), tl.bfloat16)
    return _cast(self, src, dst_type)
interpreter.InterpreterBuilder.cast_impl = _cast_rne

from krasis.shared.kernels.norm_rope_kernel import rms_norm_triton, rotate_half_triton
from krasis.shared.models.layers import Rotary, rms_norm_reference, rope_inv_freq

g = torch.Generator().manual_seed(0)
BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}

def ulps(a, b):
    # distance in units in the last place: sign-magnitude bits made monotonic
    def ordered(t):
        i = t.contiguous().view(BITS[t.dtype]).long()
        return torch.where(i < 0, -(i & (2 ** (8 * t.element_size() - 1) - 1)), i)
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    return (ordered(a) - ordered(b)).abs()

def compare(name, got, want):
    # half precision: bit for bit but where the sum of squares (added in another order) or cos/sin
    # (numpy's here, torch's in the reference) land one float32 ulp apart across a rounding
    # boundary, then one ulp off. float32: no rounding hides those, a few ulps near cancellation.
    assert got.dtype == want.dtype and got.shape == want.shape, (name, got.dtype, want.dtype, got.shape, want.shape)
    if want.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6, msg=name)
        return
    d = ulps(got, want)
    off = int((d > 0).sum())
    ok = d <= 1
    assert ok.all() and off <= want.numel() // 500, (name, int(d.max()), off, want.numel())
    return off

def compare_rotated(name, got, want):
    # rotary after a norm: a norm one ulp apart (compare's rare case) can land many ulps apart after
    # rotary's difference of products, where they cancel; so: as rare, and within two of the
    # dtype's epsilons of the head row's largest value
    if want.dtype == torch.float32:
        return compare(name, got, want)
    d = (got.float() - want.float()).abs()
    bound = 2 * torch.finfo(want.dtype).eps * want.float().abs().amax(-1, keepdim=True)
    assert got.dtype == want.dtype and got.shape == want.shape, name
    assert (d <= bound).all() and int((d > 0).sum()) <= want.numel() // 500, (name, float(d.max()), int((d > 0).sum()))

def randn(*shape, dtype):
    return torch.randn(*shape, generator=g).to(dtype)

# --- RMSNorm: hidden rows (odd count), per-head rows, rows of a wider tensor, float32 weights
for dtype in (torch.bfloat16, torch.float16, torch.float32):
    w_big, w_head = ((1 + 0.1 * randn(n, dtype=torch.float32)).to(dtype) for n in (2048, 128))
    for x, w in ((randn(37, 2048, dtype=dtype) * 3, w_big), (randn(7, 5, 128, dtype=dtype), w_head),
                 (randn(9, 192, dtype=dtype)[:, 32:160], w_head)):
        compare(("rms", dtype, tuple(x.shape)), rms_norm_triton(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))
# after a residual add: the sum exactly as torch's add rounds it, then the norm of that sum
for dtype in (torch.bfloat16, torch.float16, torch.float32):
    h, a, w = randn(5, 2048, dtype=dtype) * 3, randn(5, 2048, dtype=dtype), (1 + 0.1 * randn(2048, dtype=torch.float32)).to(dtype)
    s, y = rms_norm_triton(h, w, 1e-6, add=a)
    assert torch.equal(s, h + a), dtype
    compare(("add rms", dtype), y, rms_norm_reference(h + a, w, 1e-6))
x = randn(11, 128, dtype=torch.bfloat16)
w32 = 1 + 0.1 * randn(128, dtype=torch.float32)  # promoted: the product in float32, rounded once
compare("rms float32 weight", rms_norm_triton(x, w32, 1e-5), rms_norm_reference(x, w32, 1e-5))

# the roundings themselves: rounding only once (all float32, then to bfloat16) misses the reference
# on many elements; the kernel, only where the sum of squares ends one ulp apart
x, w = randn(37, 2048, dtype=torch.bfloat16), (1 + 0.1 * randn(2048, dtype=torch.float32)).to(torch.bfloat16)
want = rms_norm_reference(x, w, 1e-6)
kernel_off = compare("rms order", rms_norm_triton(x, w, 1e-6), want)
once_off = int((ulps(rms_norm_reference(x.float(), w.float(), 1e-6).to(torch.bfloat16), want) > 0).sum())
assert once_off > 1000 and kernel_off * 20 < once_off, ("rms rounding order", kernel_off, once_off)

# --- rotary: positions not from 0 (and two sequences' slices), YaRN's attention factor, head
# counts not a power of two, q's 32 heads, a partial rotary dim on a strided view (qwen3_next)
default = rope_inv_freq({"rope_theta": 1e6, "rope_type": "default"}, 128, 4096)
yarn = rope_inv_freq({"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}, 128, 16384)
assert yarn[1] != 1.0
starts = torch.arange(1000, 1013)
two_seqs = torch.cat([torch.arange(4090, 4096), torch.arange(0, 7)])
for dtype in (torch.bfloat16, torch.float16, torch.float32):
    for (inv_freq, af), pos, H in ((default, starts, 4), (yarn, two_seqs, 5), (yarn, torch.arange(9000, 9003), 32)):
        rot = Rotary(inv_freq, af)
        x = randn(pos.numel(), H, 128, dtype=dtype) * 2
        compare(("rope", dtype, af, H), rotate_half_triton(x, pos, inv_freq, af), rot.rotate_half_reference(x, pos))
    partial, _ = rope_inv_freq({"rope_theta": 1e4, "rope_type": "default"}, 64, 4096)
    x = randn(13, 3, 256, dtype=dtype)[..., :64]
    compare(("rope partial", dtype), rotate_half_triton(x, starts, partial, 1.0), Rotary(partial).rotate_half_reference(x, starts))

# rounding order: the reference rounds cos/sin, both products and the sum; once-rounded is float32 throughout
inv_freq, af = yarn
rot = Rotary(inv_freq, af)
x = randn(13, 32, 128, dtype=torch.bfloat16)
want = rot.rotate_half_reference(x, starts)
kernel_off = compare("rope order", rotate_half_triton(x, starts, inv_freq, af), want)
once_off = int((ulps(rot.rotate_half_reference(x.float(), starts).to(torch.bfloat16), want) > 0).sum())
assert once_off > 1000 and kernel_off * 20 < once_off, ("rope rounding order", kernel_off, once_off)

# --- q and k norms and rotary in one kernel (Qwen3), on q's and k's columns of a qkv product (a
# strided view), against rms_norm_reference then rotate_half_reference per part: the same roundings
from krasis.shared.kernels.norm_rope_kernel import qk_norm_rope_triton
for dtype in (torch.bfloat16, torch.float16, torch.float32):
    for (inv_freq, af), pos, hq, hkv in ((default, starts, 8, 2), (yarn, two_seqs, 32, 4), (yarn, torch.arange(9000, 9001), 5, 1)):
        T = pos.numel()
        qkv = randn(T, (hq + 2 * hkv) * 128, dtype=dtype) * 2
        qk = qkv[:, : (hq + hkv) * 128].view(T, hq + hkv, 128)
        wq, wk = ((1 + 0.1 * randn(128, dtype=torch.float32)).to(dtype) for _ in range(2))
        rot = Rotary(inv_freq, af)
        q, k = qk_norm_rope_triton(qk, hq, wq, wk, 1e-6, pos, inv_freq, af)
        compare_rotated(("qk_norm_rope q", dtype, hq), q, rot.rotate_half_reference(rms_norm_reference(qk[:, :hq], wq, 1e-6), pos))
        compare_rotated(("qk_norm_rope k", dtype, hkv), k, rot.rotate_half_reference(rms_norm_reference(qk[:, hq:], wk, 1e-6), pos))
print("ok")
"""


def test_triton_norm_rope_match_reference():
    pytest.importorskip("triton", reason="triton is a test dependency (pyproject's test extra)")
    tm.run_interpreted(CHECK)


def test_cpu_dispatch_is_the_reference(monkeypatch):
    """Off CUDA (and for float32 anywhere) the torch code runs, and the kernel module (which imports
    triton) is never imported: CPU workers must not load Triton."""
    monkeypatch.setitem(sys.modules, "krasis.shared.kernels.norm_rope_kernel", None)  # importing it would raise
    from krasis.shared.models.layers import Rotary, add_rms_norm, qk_norm_rope, rms_norm, rms_norm_reference, rope_inv_freq

    g = torch.Generator().manual_seed(5)
    rot = Rotary(*rope_inv_freq({"rope_theta": 1e4, "rope_type": "default"}, 64, 128))
    pos = torch.arange(5, 8)
    for dtype in (torch.bfloat16, torch.float32):
        x, w = torch.randn(3, 2, 64, generator=g).to(dtype), torch.rand(64, generator=g).to(dtype)
        assert torch.equal(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))
        assert torch.equal(rot.rotate_half(x, pos), rot.rotate_half_reference(x, pos))
        s, y = add_rms_norm(x, x, w, 1e-6)
        assert torch.equal(s, x + x) and torch.equal(y, rms_norm_reference(x + x, w, 1e-6))
        q, k = qk_norm_rope(x, 1, w, w, 1e-6, rot, pos)
        assert torch.equal(q, rot.rotate_half_reference(rms_norm_reference(x[:, :1], w, 1e-6), pos))
        assert torch.equal(k, rot.rotate_half_reference(rms_norm_reference(x[:, 1:], w, 1e-6), pos))
