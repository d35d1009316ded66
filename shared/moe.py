"""Routed experts: the plain reference implementation every fast kernel is compared with.

    out[t] = sum_j w[t, j] * Expert_{ids[t, j]}(x[t])
    Expert(x) = W2 act(W13 x),  W13 = [W_gate; W_up]
    act = silu(g) * u                                     ("silu", Qwen3 / DeepSeek)
    act = (u + 1) * g * sigmoid(1.702 g), g, u clamped    ("gptoss")

The experts given are a contiguous block [first, first + count) of the layer; ids outside it
contribute nothing, so each holder of a block computes a partial sum and the caller adds them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .expert_store import ExpertFormat

GPTOSS_ALPHA, GPTOSS_LIMIT = 1.702, 7.0


def gated_act(gu: torch.Tensor, act: str) -> torch.Tensor:
    if act == "silu":
        g, u = gu.chunk(2, dim=-1)
        return F.silu(g) * u
    if act == "gptoss":
        # gpt-oss interleaves gate and up columns in its fused projection; our W13 keeps [gate; up].
        g, u = gu.chunk(2, dim=-1)
        g = g.clamp(max=GPTOSS_LIMIT)
        u = u.clamp(min=-GPTOSS_LIMIT, max=GPTOSS_LIMIT)
        return (u + 1) * (g * torch.sigmoid(g * GPTOSS_ALPHA))
    raise ValueError(f"unknown expert activation {act!r}")


def expert_weights(fmt: ExpertFormat, t: dict[str, torch.Tensor], local: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(W13 [2I, H], W2 [H, I]) of one expert in `dtype`, dequantized if stored quantized."""
    if fmt.kind == "dense":
        return t["w13"][local].to(dtype), t["w2"][local].to(dtype)
    from .quant import dequantize

    return dequantize(fmt, t, "w13", local).to(dtype), dequantize(fmt, t, "w2", local).to(dtype)


def moe_reference(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    t: dict[str, torch.Tensor],
    fmt: ExpertFormat,
    first: int,
    count: int,
    act: str = "silu",
) -> torch.Tensor:
    """x [M, H], ids [M, k], weights [M, k] -> partial sum [M, H] in x's dtype (accumulated in
    float32) over the experts [first, first + count) whose tensors `t` are given."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    local = ids.long() - first
    hit = (local >= 0) & (local < count)
    for e in torch.unique(local[hit]).tolist():
        tok, slot = torch.where(local == e)
        w13, w2 = expert_weights(fmt, t, e, x.dtype)
        gu = F.linear(x[tok], w13, t["b13"][e].to(x.dtype) if "b13" in t else None)
        y = F.linear(gated_act(gu, act), w2, t["b2"][e].to(x.dtype) if "b2" in t else None)
        out.index_add_(0, tok, y.float() * weights[tok, slot, None].float())
    return out.to(x.dtype)
