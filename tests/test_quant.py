"""The quantization scheme (shared/quant.py, docs/quantization.md) against an independent numpy
implementation of what the documentation says."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from krasis.shared.quant import QMAX, QuantError, QuantLinear, dequantize_q, fake_quantize, pack_int4, quantize, unpack_int4


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest bfloat16 (ties to even), returned as float32."""
    b = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.astype(np.uint32).view(np.float32)


def np_quantize(w: np.ndarray, bits: int, g: int) -> tuple[np.ndarray, np.ndarray]:
    qmax = {4: 7, 8: 127}[bits]
    o, k = w.shape
    wg = w.astype(np.float32).reshape(o, k // g, g)
    scale = bf16_round(np.abs(wg).max(axis=-1) / np.float32(qmax))
    q = np.zeros_like(wg)
    nz = scale > 0
    q[nz] = np.round(wg[nz] / scale[nz][:, None])  # numpy rounds half to even
    return np.clip(q, -qmax - 1, qmax).astype(np.int8).reshape(o, k), scale


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("g", [16, 64])
def test_quantize_matches_numpy(bits, g):
    gen = torch.Generator().manual_seed(bits * 100 + g)
    w = torch.randn(48, 128, generator=gen) * torch.rand(48, 1, generator=gen) * 3
    w[5, :g] = 0  # one all-zero group
    q, s = quantize(w, bits, g)
    nq, ns = np_quantize(w.numpy(), bits, g)
    assert s.dtype == torch.bfloat16 and s.shape == (48, 128 // g)
    np.testing.assert_array_equal(q.numpy(), nq)
    np.testing.assert_array_equal(s.float().numpy(), ns)
    deq = dequantize_q(q, s)
    np.testing.assert_array_equal(deq.numpy(), (nq.reshape(48, -1, g) * ns[..., None]).reshape(48, 128))
    assert torch.equal(fake_quantize(w, bits, g), deq)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("o, k, g", [(48, 128, 32), (7, 96, 96), (5, 36, 9), (3, 64, 128)])
def test_one_pass_kernel_gives_the_torch_bytes(dtype, bits, o, k, g):
    """quant_kernel.py (what the converters run on 16-bit experts and GGUF's float and K-quant
    tensors) against quantize + pack_int4: the same codes and scales, bit for bit, with zero groups,
    ties, large and tiny magnitudes, and groups that end inside an INT4 byte (g = 9) or span the
    whole row (g > K); a stack of experts [n, O, K] as one."""
    from krasis.shared.quant_kernel import quantize_weight

    gen = torch.Generator().manual_seed(o * k + g + bits)
    span = 30 if dtype != torch.float16 else 4  # fp16 holds 1e-4 .. 6e4
    w = (torch.randn(2, o, k, generator=gen) * torch.logspace(-span, span, o).unsqueeze(1)).to(dtype)
    w[0, 0, : min(g, k)] = 0  # an all-zero group
    w[1, -1, :8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 7.0])  # ties, when the group's max is 7 * 2^n
    q, s = quantize(w, bits, g)
    want = pack_int4(q) if bits == 4 else q
    got_q, got_s = quantize_weight(w, bits, min(g, k), QMAX[bits])
    assert got_q.dtype == want.dtype and torch.equal(got_q, want)
    assert got_s.dtype == torch.bfloat16 and torch.equal(got_s.view(torch.int16), s.view(torch.int16))


def test_round_half_to_even_and_zero_groups():
    # max|w| = 7 gives scale 1 exactly, so w / scale lands on the .5 ties
    w = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 7.0], [0.0] * 8])
    q, s = quantize(w, 4, 8)
    assert s.float().tolist() == [[1.0], [0.0]]
    assert q.tolist() == [[0, 2, 2, 0, -2, -2, 4, 7], [0] * 8]
    assert torch.equal(fake_quantize(w, 4, 8)[1], torch.zeros(8))


@pytest.mark.parametrize("bits", [4, 8])
def test_range_and_error_bound(bits):
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(64, 256, generator=gen) * 10
    q, s = quantize(w, bits, 32)
    assert int(q.min()) >= -QMAX[bits] - 1 and int(q.max()) <= QMAX[bits]
    # every value is within half a step (the bf16 scale can be a hair smaller than max/qmax, so
    # the group maximum may sit just past qmax * scale; allow bf16's relative rounding for it)
    err = (dequantize_q(q, s) - w).abs().reshape(64, 8, 32)
    step = s.float().unsqueeze(-1)
    assert bool((err <= step * 0.5 + w.abs().reshape(64, 8, 32).amax(-1, keepdim=True) * 2**-8).all())


def test_int4_pack_unpack_against_numpy():
    gen = torch.Generator().manual_seed(7)
    q = torch.randint(-8, 8, (5, 32), generator=gen, dtype=torch.int8)
    q[0, :16] = torch.arange(-8, 8, dtype=torch.int8)  # every value appears
    packed = pack_int4(q)
    nq = q.numpy().astype(np.int16) + 8
    want = (nq[:, 0::2] | (nq[:, 1::2] << 4)).astype(np.uint8)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 16)
    np.testing.assert_array_equal(packed.numpy(), want)
    assert torch.equal(unpack_int4(packed), q)


def test_group_must_divide_k():
    with pytest.raises(QuantError, match="not a multiple"):
        quantize(torch.ones(4, 48), 8, 32)
    q, s = quantize(torch.ones(4, 8), 8, 128)  # K below the group size: one group of K
    assert s.shape == (4, 1)


def test_quant_linear_is_dequantize_then_linear():
    gen = torch.Generator().manual_seed(3)
    w, x = torch.randn(24, 40, generator=gen), torch.randn(5, 40, generator=gen)
    ql = QuantLinear.quantize(w)
    nq, ns = np_quantize(w.numpy(), 8, 40)
    np.testing.assert_array_equal(ql.q.numpy(), nq)
    assert ql.scale.shape == (24, 1) and ql.device == w.device
    want = x.numpy() @ (nq.astype(np.float32) * ns).T
    np.testing.assert_allclose(ql.matmul_t(x).numpy(), want, rtol=1e-5, atol=1e-5)
    from krasis.shared.models.layers import linear

    b = torch.randn(24, generator=gen)
    assert torch.allclose(linear(x, ql, b), torch.nn.functional.linear(x, fake_quantize(w, 8, 40), b))
    # in the scales' dtype (bf16) the weights are multiplied there: the float32 path's bits, every
    # rounding of q * scale included (random scales; whole-range q)
    full = QuantLinear(torch.arange(-127, 128, dtype=torch.int8).repeat(300, 1),
                       torch.randn(300, 1, generator=gen).abs().bfloat16())
    for q in (ql, QuantLinear(ql.q, ql.scale.bfloat16()), full):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            assert torch.equal(q.dequantize(dtype), dequantize_q(q.q, q.scale).to(dtype)), (q.scale.dtype, dtype)
