"""Routed experts: the plain reference implementation every fast kernel is compared with.

    out[t] = sum_j w[t, j] * Expert_{ids[t, j]}(x[t])
    Expert(x) = W2 act(W13 x),  W13 = [W_gate; W_up]
    act = silu(g) * u                                     ("silu", Qwen3 / DeepSeek)
    act = (u + 1) * g * sigmoid(1.702 g), g, u clamped    ("gptoss")

The experts given are a contiguous block [first, first + count) of the layer; ids outside it
contribute nothing, so each holder of a block computes a partial sum and the caller adds them.

moe_reference_q8 is the plain form of the CPU pool's Q8 path (INT4 experts, bf16 x: activations
quantized to int8 per group, docs/quantization.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .expert_store import ExpertFormat

GPTOSS_ALPHA, GPTOSS_LIMIT = 1.702, 7.0
BIAS = {"w13": "b13", "w2": "b2"}  # each weight's bias, where experts have them


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


def expert_weight(fmt: ExpertFormat, t: dict[str, torch.Tensor], name: str, local: int, dtype) -> torch.Tensor:
    """W13 [2I, H] (name "w13") or W2 [H, I] ("w2") of one expert in `dtype`, dequantized if stored
    quantized."""
    if fmt.kind == "dense":
        return t[name][local].to(dtype)
    from .quant import dequantize

    return dequantize(fmt, t, name, local).to(dtype)


def _routed(x, ids, weights, first: int, count: int, act: str, linear) -> torch.Tensor:
    """The routing and combining both references share; linear(v, name, e) = v W^T + b of expert e's
    weight `name` ("w13", "w2")."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    local = ids.long() - first
    hit = (local >= 0) & (local < count)
    for e in torch.unique(local[hit]).tolist():
        tok, slot = torch.where(local == e)
        y = linear(gated_act(linear(x[tok], "w13", e), act), "w2", e)
        out.index_add_(0, tok, y.float() * weights[tok, slot, None].float())
    return out.to(x.dtype)


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

    def linear(v, name, e):
        b = t[BIAS[name]][e].to(x.dtype) if BIAS[name] in t else None
        return F.linear(v, expert_weight(fmt, t, name, e, x.dtype), b)

    return _routed(x, ids, weights, first, count, act, linear)


def moe_reference_q8(x, ids, weights, t, fmt: ExpertFormat, first: int, count: int, act: str = "silu") -> torch.Tensor:
    """moe_reference (same contract) for INT4 experts with their inputs quantized to int8, as the CPU
    pool's C kernel does for bf16 x (docs/quantization.md, "Activations in the CPU pool"): each input
    vector (x, then the float32 activation) per group of the weight's K-group: xs = max|v| / 127 in float32,
    xq = round_half_even(v / xs) (0 for an all-zero group); each output row is the float32 sum over
    groups of f32(scale) * xs * sum(q * xq), the integer sums exact (int64 here). Computed in float32
    from x's values, returned in x's dtype."""
    if fmt.kind != "int4":
        raise ValueError(f"the Q8 reference is for INT4 experts, not {fmt.kind}")
    from .quant import unpack_int4

    def linear(v, name, e):
        q, s = unpack_int4(t[f"{name}.q"][e]).long(), t[f"{name}.s"][e].float()  # [O, K] signed, [O, G]
        vg = v.float().reshape(v.shape[0], s.shape[1], -1)
        xs = vg.abs().amax(dim=-1) / 127
        xq = torch.where(xs[..., None] > 0, torch.round(vg / torch.where(xs > 0, xs, 1.0)[..., None]), 0.0).long()
        dots = torch.einsum("ngk,ogk->nog", xq, q.reshape(q.shape[0], s.shape[1], -1))
        y = (s * xs[:, None, :] * dots.float()).sum(dim=-1)
        return y + t[BIAS[name]][e].float() if BIAS[name] in t else y

    return _routed(x.float(), ids, weights, first, count, act, linear).to(x.dtype)
