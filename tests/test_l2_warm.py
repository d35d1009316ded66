"""The decode turn's L2 warm-up (gpu_worker/l2_warm_kernel.py): under Triton's interpreter, the
kernel reads every whole 32-bit word of the tensors it keeps exactly once (the XOR of its reads
against warm_reference's), and it keeps what its budget and layout allow; a layer's tensors()
(what the warm-up reads, and the weights a GPU worker reports) hold every weight its decode turn
reads, an INT8 product's rows and scales included, and none of the family's."""

from __future__ import annotations

import pytest
import torch

import tiny_models as tm

CHECK = r"""
import torch
from krasis.gpu_worker.l2_warm_kernel import L2Warm, warm_reference

g = torch.Generator().manual_seed(0)
def words(n, dtype):  # random bits of any dtype
    return torch.randint(-2**31, 2**31 - 1, (n,), generator=g, dtype=torch.int32).view(torch.uint8)[: n * 4 // dtype.itemsize * dtype.itemsize].view(dtype)
# lengths across the kernel's 4096-word block, under one, one word, and a tail of bytes past the last word
ts = [words(9000, torch.bfloat16), words(3, torch.float32), words(1, torch.int32), torch.randint(-100, 100, (7, 9), generator=g, dtype=torch.int8)]
cpu = torch.device("cpu")
for programs in (1, 3):
    w = L2Warm(ts, cpu, 1 << 30, programs=programs)
    assert w.tensors == ts
    w()
    assert w.checksum() == warm_reference(ts), programs
    w()  # a second launch reads the same words (the sink is overwritten, not accumulated)
    assert w.checksum() == warm_reference(ts)
# the budget keeps tensors in order while they fit; a view 2 bytes into its storage, a strided view
# and a tensor of fewer than 4 bytes are left out
big, small = words(9000, torch.bfloat16), words(2, torch.float32)
odd, strided, tiny = big[1:], big[::2], torch.zeros(1, dtype=torch.int16)
w = L2Warm([small, odd, strided, tiny, big, small], cpu, small.numel() * 4 * 2 + 1, programs=2)
assert [id(t) for t in w.tensors] == [id(small), id(small)] and w.nbytes == 16
w = L2Warm([big, small], cpu, 1000, programs=2)
assert [id(t) for t in w.tensors] == [id(small)]
w()
assert w.checksum() == warm_reference([small])
print("ok")
"""


def test_warm_reads_every_word_once():
    pytest.importorskip("triton", reason="triton is a test dependency (pyproject's test extra)")
    tm.run_interpreted(CHECK)


@pytest.mark.parametrize("attn_int8", [False, True])
def test_a_layers_tensors_are_its_turns_weights(attn_int8):
    """A Qwen3-MoE layer's warm-up holds every weight its decode turn reads (norms, q/k/v and o, q/k
    norms, the router), as stored: with --attn-bits 8 the products' INT8 rows and scales."""
    pytest.importorskip("triton", reason="triton is a test dependency (pyproject's test extra)")
    from krasis.gpu_worker.l2_warm_kernel import L2Warm
    from krasis.shared.models.qwen3_moe import Qwen3Moe
    from krasis.shared.quant import QuantLinear

    fam = Qwen3Moe(tm.qwen3_config().to_dict())
    g = torch.Generator().manual_seed(1)
    weights = {n: torch.randn(s, generator=g) for n, s in fam.layer_tensors(1).items()}

    def get(name):
        w = weights[name]
        return QuantLinear.quantize(w) if attn_int8 and name.endswith("_proj.weight") else w

    layer = fam.make_layer(1, get)
    found = {t.data_ptr() for t in layer.tensors()}
    products = [layer.wqkv, layer.wo]
    parts = [t for w in products for t in ((w.q, w.scale) if attn_int8 else (w,))]
    for t in [layer.ln1, layer.ln2, layer.q_norm, layer.k_norm, layer.router, *parts]:
        assert t.data_ptr() in found
    assert not any(isinstance(v, torch.Tensor) and v.data_ptr() in found for v in vars(fam).values())
    # a step's rotary tables (cached in the rotary's private attributes) are not the layer's weights
    positions = torch.arange(5)
    layer.rotary.rotate_half_reference(torch.zeros(5, 2, 16), positions)
    assert layer.rotary._last is not None
    assert {t.data_ptr() for t in layer.tensors()} == found
    whole = L2Warm(layer.tensors(), torch.device("cpu"), 1 << 30, programs=1)
    assert whole.nbytes >= sum(t.numel() * t.element_size() for t in parts)


def test_a_dense_layers_tensors_hold_its_mlp():
    """A dense layer's MLP (a tuple of three weights) is among its tensors: the GPU worker's reported
    weight bytes counted only a layer's plain tensor attributes before, missing it and every INT8
    product."""
    from krasis.shared.models.qwen3_moe import Qwen3Moe

    fam = Qwen3Moe(tm.qwen3_config(mlp_only_layers=[1]).to_dict())
    g = torch.Generator().manual_seed(2)
    layer = fam.make_layer(1, lambda name: torch.randn(fam.layer_tensors(1)[name], generator=g))
    assert not layer.is_moe
    found = {t.data_ptr() for t in layer.tensors()}
    assert all(w.data_ptr() in found for w in layer.mlp)
    # every tensor the checkpoint holds for the layer is among them (q, k and v stacked into one; the
    # rotary's tables on top)
    shapes = fam.layer_tensors(1)
    assert sum(t.numel() for t in layer.tensors()) >= sum(torch.Size(s).numel() for s in shapes.values())
