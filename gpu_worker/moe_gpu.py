"""Routed experts on the worker's device: tokens sorted by expert, the active experts' weights
dequantized once on the device, then one grouped GEMM per projection.

    rows  = (token, slot) pairs whose expert is held by a block, sorted by expert
    W13_g = dequant(q13_g, s13_g), W2_g = dequant(q2_g, s2_g)      for the G active experts only (dequant.py)
    Y     = grouped_mm(X_sorted, W13^T);  A = act(Y);  Z = grouped_mm(A, W2^T)
    out  += scatter_add(token, Z * w)                                 accumulated in float32

A block is (tensors, lookup): tensors in an ExpertFormat layout ([n, ...] per name) wherever they
live (pinned host views, a staging slot, a hot-expert cache) and `lookup` int64 [num_experts] that
maps a layer's expert id to its row in the tensors, or -1 where the block does not hold it. Every
strategy hands its experts to `moe_blocks` in that one form.

`torch._grouped_mm` (bf16, sm90) is used on CUDA; elsewhere, and in float32, the same sorted rows go
through one F.linear per active expert. `shared/moe.py:moe_reference` is the plain reference; the
two agree to rounding (tests/test_strategies.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..shared.expert_store import ExpertFormat
from ..shared.moe import gated_act
from .dequant import dequant_rows


def _grouped_ok(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")


def _project(xs: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, counts: list[int], grouped: bool) -> torch.Tensor:
    """Rows xs [R, K] sorted into groups of `counts`, times W_g^T for w [G, O, K] -> [R, O]."""
    if grouped:
        return torch._grouped_mm(xs, w.transpose(-2, -1), offs=offs)
    out, a = [], 0
    for g, c in enumerate(counts):
        out.append(F.linear(xs[a : a + c], w[g]))
        a += c
    return torch.cat(out)


def moe_blocks(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    blocks: list[tuple[dict[str, torch.Tensor], torch.Tensor]],
    fmt: ExpertFormat,
    act: str = "silu",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, H], ids [M, k], weights [M, k] -> float32 [M, H]: the weighted sum over the experts the
    blocks hold (added into `out` when given)."""
    if out is None:
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    grouped = _grouped_ok(x)
    ids = ids.to(x.device).long()
    for t, lookup in blocks:
        local = lookup[ids]  # [M, k]
        tok, slot = torch.nonzero(local >= 0, as_tuple=True)
        if tok.numel() == 0:
            continue
        rows = local[tok, slot]
        rows, order = torch.sort(rows, stable=True)
        tok = tok[order]
        w_tok = weights.to(x.device)[tok, slot[order]].float()
        active, counts_t = torch.unique_consecutive(rows, return_counts=True)
        counts = counts_t.tolist()
        offs = torch.cumsum(counts_t, 0).to(torch.int32)
        xs = x.index_select(0, tok)
        w13 = dequant_rows(fmt, t, "w13", active, x.dtype)
        gu = _project(xs, w13, offs, counts, grouped)
        del w13
        if "b13" in t:
            gu = gu + t["b13"].index_select(0, active).to(x.dtype).repeat_interleave(counts_t, 0)
        a = gated_act(gu, act)
        del gu
        w2 = dequant_rows(fmt, t, "w2", active, x.dtype)
        y = _project(a, w2, offs, counts, grouped)
        del w2, a
        if "b2" in t:
            y = y + t["b2"].index_select(0, active).to(x.dtype).repeat_interleave(counts_t, 0)
        out.index_add_(0, tok, y.float() * w_tok[:, None])
    return out


def block_lookup(num_experts: int, first: int, count: int, device) -> torch.Tensor:
    """The lookup of a contiguous block [first, first + count) stored in order."""
    lk = torch.full((num_experts,), -1, dtype=torch.long)
    lk[first : first + count] = torch.arange(count)
    return lk.to(device)
