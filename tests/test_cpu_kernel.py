"""The CPU pool's layer kernel (cpu_worker/expert_kernel.py) against the plain reference
(shared/moe.py:moe_reference) on the same stored experts.

Tolerances: float32 inputs are compared to 2e-5 of the output's largest magnitude (the kernel sums
in another order, and folds INT4's -8 offset per group); bfloat16 inputs to 2e-2, since the reference
rounds the dequantized weights and every intermediate to bf16 while the kernel keeps float32 until
the output is rounded once.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from krasis.cpu_worker.expert_kernel import moe_layer
from krasis.shared.expert_store import ExpertFormat
from krasis.shared.models.family import ExpertShape
from krasis.shared.moe import moe_reference
from krasis.shared.quant import quantized

HIDDEN, INTER, TOP_K = 256, 128, 4
FIRST, COUNT, LAYER_EXPERTS = 3, 6, 12  # this node holds experts [3, 9) of 12

FORMATS = {
    "int4-g64": ExpertFormat("int4", group_size=64),
    "int4-g128": ExpertFormat("int4", group_size=128),
    "int8-g64": ExpertFormat("int8", group_size=64),
    "dense-f32": ExpertFormat("dense", torch.float32),
    "dense-bf16": ExpertFormat("dense", torch.bfloat16),
}


def node_block(fmt: ExpertFormat, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A node's experts in the store layout, from random weights quantized by the scheme."""
    spec = fmt.tensors(ExpertShape(LAYER_EXPERTS, TOP_K, HIDDEN, INTER), COUNT)
    t = {name: torch.empty(shape, dtype=dtype) for name, (dtype, shape) in spec.items()}
    for e in range(COUNT):
        w13 = torch.randn(2 * INTER, HIDDEN, generator=gen) * 0.05
        w2 = torch.randn(HIDDEN, INTER, generator=gen) * 0.05
        if fmt.kind == "dense":
            t["w13"][e], t["w2"][e] = w13, w2
        else:
            for name, v in (quantized(fmt, w13, "w13") | quantized(fmt, w2, "w2")).items():
                t[name][e] = v
    return t


def routing(m: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """ids over the whole layer (so some fall outside this node's block), with repeats across
    tokens and, for some tokens, the same expert twice."""
    ids = torch.randint(0, LAYER_EXPERTS, (m, TOP_K), generator=gen, dtype=torch.int32)
    ids[::3, 1] = ids[::3, 0]
    ids[0, 0] = FIRST  # at least one token hits the block
    return ids, torch.rand(m, TOP_K, generator=gen)


@pytest.mark.parametrize("fmt_name", list(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("m", [1, 3, 8, 32])
def test_kernel_matches_reference(fmt_name, dtype, m):
    fmt = FORMATS[fmt_name]
    gen = torch.Generator().manual_seed(zlib.crc32(f"{fmt_name} {dtype} {m}".encode()))
    t = node_block(fmt, gen)
    x = (torch.randn(m, HIDDEN, generator=gen) * 2).to(dtype)
    ids, weights = routing(m, gen)
    got = moe_layer(x, ids, weights, t, fmt, FIRST, COUNT)
    want = moe_reference(x, ids, weights, t, fmt, FIRST, COUNT)
    assert got.dtype == x.dtype and got.shape == x.shape
    scale = want.float().abs().max()
    assert scale > 0
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert (got.float() - want.float()).abs().max() <= tol * scale


@pytest.mark.parametrize("fmt_name", ["int4-g64", "int8-g64"])
def test_tokens_outside_the_block_get_zero_and_rows_are_independent(fmt_name):
    """A token whose experts all live on another node gets exactly 0; a token's result does not
    depend on which other tokens share the batch (the grouping by expert must not mix rows)."""
    fmt = FORMATS[fmt_name]
    gen = torch.Generator().manual_seed(7)
    t = node_block(fmt, gen)
    x = torch.randn(5, HIDDEN, generator=gen)
    ids, weights = routing(5, gen)
    ids[2] = torch.tensor([0, 1, 2, FIRST + COUNT])  # all outside [FIRST, FIRST + COUNT)
    out = moe_layer(x, ids, weights, t, fmt, FIRST, COUNT)
    assert torch.all(out[2] == 0)
    for i in (0, 4):
        alone = moe_layer(x[i : i + 1], ids[i : i + 1], weights[i : i + 1], t, fmt, FIRST, COUNT)
        torch.testing.assert_close(out[i : i + 1], alone, rtol=0, atol=2e-5 * float(alone.abs().max()))


def test_no_token_in_the_block():
    fmt = FORMATS["int4-g128"]
    t = node_block(fmt, torch.Generator().manual_seed(1))
    x = torch.randn(2, HIDDEN, dtype=torch.bfloat16)
    out = moe_layer(x, torch.zeros(2, TOP_K, dtype=torch.int32), torch.ones(2, TOP_K), t, fmt, FIRST, COUNT)
    assert out.dtype == torch.bfloat16 and torch.all(out == 0)
