"""The Triton kernel behind layers.softmax_topk on CUDA: a MoE router's softmax, top-k and optional
renormalisation of the k weights, one program per token.

Why: in torch this is five to seven kernels per layer (a float32 cast, softmax, topk's gather and
sort, a sum and a division), ~15 us of a decode layer's ~120 us of GPU work outside the CPU pool's
turn on the lent H100 (BENCHMARKS.md, decode profile), for a row of 64-256 numbers.

Arithmetic is layers.softmax_topk_reference's: p = exp(x - max) / sum(exp(x - max)) in float32 with
libdevice's expf (the function torch's softmax calls), then the k largest p, largest first, the
lower index first among equal values; renormalised, w = p / sum of the k. Only the order of the
float32 sum of exponentials differs from torch's, so a weight may be an ulp or two off, and a token
whose k-th and (k+1)-th probabilities lie that close may choose the other expert.

CUDA graphs: no host syncs; the outputs are allocated from the input's shape.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

# The interpreter cannot call libdevice (extern) functions; numpy's exp stands in there.
_LIBDEVICE = tl.constexpr(not triton.knobs.runtime.interpret)


@triton.jit
def _exp(x):
    if _LIBDEVICE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def _softmax_topk(x_ptr, ids_ptr, w_ptr, E, stride, K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr,
                  RENORM: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride + cols, mask=cols < E, other=float("-inf")).to(tl.float32)
    e = _exp(x - tl.max(x, 0))
    p = e / tl.sum(e, 0)
    p = tl.where(cols < E, p, -1.0)  # padding never wins
    slots = tl.arange(0, KP)
    ids = tl.zeros([KP], dtype=tl.int64)
    w = tl.zeros([KP], dtype=tl.float32)
    for j in tl.static_range(K):
        best = tl.max(p, 0)
        at = tl.min(tl.where(p == best, cols, BLOCK), 0)  # the lowest index holding the maximum
        ids = tl.where(slots == j, at.to(tl.int64), ids)
        w = tl.where(slots == j, best, w)
        p = tl.where(cols == at, -1.0, p)
    if RENORM:
        w = w / tl.sum(w, 0)  # the padding slots hold 0
    tl.store(ids_ptr + row * K + slots, ids, mask=slots < K)
    tl.store(w_ptr + row * K + slots, w, mask=slots < K)


def softmax_topk_triton(logits: torch.Tensor, k: int, renorm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [M, E] -> (ids int64 [M, k], weights float32 [M, k])."""
    m, e = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    ids = torch.empty(m, k, dtype=torch.int64, device=logits.device)
    w = torch.empty(m, k, dtype=torch.float32, device=logits.device)
    if m:
        _softmax_topk[(m,)](logits, ids, w, e, logits.stride(0), K=k, KP=triton.next_power_of_2(k),
                            BLOCK=triton.next_power_of_2(e), RENORM=renorm)
    return ids, w
