"""How a MoE layer's router spreads its choices (docs/routing.md): the load over the experts and the
repetition of choices between consecutive tokens.

    load share  q_e = tokens choosing e / tokens            (sums to top_k)
    max/mean    max_e q_e / mean_e q_e                     1 when balanced
    CV          std_e q_e / mean_e q_e                     0 when balanced
    entropy     H(q / top_k) / log(num_experts)            1 when balanced
    overlap     mean |top_k(t) & top_k(t + 1)|             consecutive tokens' shared choices
    chance      sum_e q_e^2                                the overlap of two unrelated tokens with
                                                           these loads (k^2 / E when balanced)
    locality    overlap / chance                           1 when nearby tokens are no more alike
                                                           than any two
    next-layer  |top_k of layer L+1's router applied to    how well layer L's router input predicts
    predictability  layer L's router input & its actual     layer L+1's experts (for prefetching them)
                top_k| / top_k, mean over tokens

The GPU workers count the choices and the consecutive overlaps as prefill runs (gpu_worker/hcs.py);
`krasis-coord calibrate` reports these figures from them.
"""

from __future__ import annotations

import math

import torch

# What trained routers show over a long input (docs/routing.md); a layer outside them fails.
TARGETS = {"max_mean": 2.0, "entropy": 0.95, "locality": 1.2}


def count_choices(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 [num_experts]: how often each expert appears in ids (any shape, values in
    [0, num_experts)), on ids' device with no wait for it. torch.bincount on CUDA reads the ids'
    least and largest value back to the host first: two synchronisations a call, which in the
    prefill loop (twice per layer and chunk) left the GPU idle while the host caught up (a
    10K-token step profiled on an H200, 2026-12-05: 3.6 ms of host waiting per call)."""
    flat = ids.reshape(-1).long()
    return torch.zeros(num_experts, dtype=torch.int64, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat))


def consecutive_overlap(ids: torch.Tensor) -> torch.Tensor:
    """Sum over consecutive rows of ids [T, k] of the count of ids they share (on ids' device)."""
    return (ids[1:, :, None] == ids[:-1, None, :]).sum()


def layer_stats(counts, top_k: int, overlap: int = 0, pairs: int = 0) -> dict:
    """The figures above for one layer: counts [E] of each expert's choices (top_k per token),
    `overlap` the summed shared choices of `pairs` consecutive token pairs (no locality figures
    without pairs)."""
    c = torch.as_tensor(counts, dtype=torch.float64)
    total = float(c.sum())
    if total == 0:
        raise ValueError("no routed choices were counted")
    p = c / total
    mean = float(c.mean())
    out = {"max_mean": float(c.max()) / mean, "cv": float(c.std(unbiased=False)) / mean,
           "entropy": -float((p[p > 0] * p[p > 0].log()).sum()) / math.log(len(c))}
    if pairs:
        q = c / (total / top_k)
        out.update(overlap=overlap / pairs, chance=float((q**2).sum()))
        out["locality"] = out["overlap"] / out["chance"]
    return out


def choice_stats(ids: torch.Tensor, num_experts: int) -> dict:
    """layer_stats of the choices ids [T, k] of consecutive tokens."""
    counts = count_choices(ids, num_experts)
    return layer_stats(counts, ids.shape[1], int(consecutive_overlap(ids)), ids.shape[0] - 1)


def next_layer_predictability(x: torch.Tensor, next_router: torch.Tensor, next_ids: torch.Tensor) -> float:
    """The mean share of layer L+1's choices next_ids [T, k] that its router weight [E, hidden] (no
    bias) picks from layer L's router input x [T, hidden]."""
    guess = (x.float() @ next_router.float().T).topk(next_ids.shape[1], -1).indices
    return float((guess[:, :, None] == next_ids[:, None, :]).sum()) / next_ids.numel()


def failures(stats: dict) -> list[str]:
    """The targets a layer's figures miss, as text ([] when it meets them all)."""
    out = []
    if stats["max_mean"] > TARGETS["max_mean"]:
        out.append(f"max/mean load {stats['max_mean']:.2f} > {TARGETS['max_mean']}")
    if stats["entropy"] < TARGETS["entropy"]:
        out.append(f"entropy {stats['entropy']:.3f} < {TARGETS['entropy']}")
    if "locality" in stats and stats["locality"] < TARGETS["locality"]:
        out.append(f"locality {stats['locality']:.2f} < {TARGETS['locality']}")
    return out
