"""The Triton kernels behind layers.softmax_topk and layers.router_topk on CUDA: a MoE router's
softmax, top-k and optional renormalisation of the k weights, after the router's product itself for
a decode step's few tokens.

Why: in torch this is five to seven kernels per layer (a float32 cast, softmax, topk's gather and
sort, a sum and a division), ~15 us of a decode layer's ~120 us of GPU work outside the CPU pool's
turn on the lent H100 (BENCHMARKS.md, decode profile), for a row of 64-256 numbers. The product
that gives those numbers was a cuBLAS GEMV of its own, 5.0 us for Qwen3-30B-A3B's 0.5 MB router
(session 24's trace): a few of the device's SMs read it while the rest idle, and the top-k waited
for its launch. `router_topk` spreads the product over BLOCK_E-expert programs, each one full
row-block load deep, and the last program to finish (an atomic count) runs the softmax and top-k:
one launch of a decode layer's turn, where the pool, or the device's own experts, waits for it.

Arithmetic is layers.softmax_topk_reference's: p = exp(x - max) / sum(exp(x - max)) in float32 with
libdevice's expf (the function torch's softmax calls), then the k largest p, largest first, the
lower index first among equal values; renormalised, w = p / sum of the k. Only the order of the
float32 sum of exponentials differs from torch's, so a weight may be an ulp or two off, and a token
whose k-th and (k+1)-th probabilities lie that close may choose the other expert. router_topk's
logits are float32 sums of the exact products rounded to x's dtype, as F.linear returns them; the
order of the sum is this kernel's, not cuBLAS's (which is not fixed either), so a logit may round to
the neighbouring value in x's dtype.

CUDA graphs: no host syncs; the outputs are allocated from the input's shape, and router_topk's
count, one int32 per router weight, is back at 0 when the kernel ends, so a replay finds it so.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .norm_rope_kernel import _inv_rms, _weighted

# The interpreter cannot call libdevice (extern) functions; numpy's exp stands in there.
_LIBDEVICE = tl.constexpr(not triton.knobs.runtime.interpret)

# router_topk's limits: a program holds BLOCK_E full rows of the router, FUSED_ELEMENTS weights (16
# KiB of bf16: 128 bytes a thread of 4 warps, all loads in flight at once); wider rows, more tokens
# or experts than these take the product and the top-k as two kernels.
FUSED_ELEMENTS = 8192
FUSED_MAX_EXPERTS = 1024
# The last program's top-k runs token after token: at 1 / 2 / 4 / 8 tokens one kernel took 5.2 /
# 8.3 / 14.2 / 26.9 us against 7.9 / 8.2 / 8.2 / 8.2 for cuBLAS's product + softmax_topk (H100,
# session 27): fused for a step of one or two sequences, where it saves a launch or two.
FUSED_MAX_TOKENS = 2


@triton.jit
def _exp(x):
    if _LIBDEVICE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def _topk_row(x, cols, E, K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr, RENORM: tl.constexpr):
    # x: one token's float32 logits at cols (-inf past E) -> (ids int64 [KP], weights float32 [KP])
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
    return ids, w


@triton.jit
def _softmax_topk(x_ptr, ids_ptr, w_ptr, E, stride, K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr,
                  RENORM: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride + cols, mask=cols < E, other=float("-inf")).to(tl.float32)
    ids, w = _topk_row(x, cols, E, K, KP, BLOCK, RENORM)
    slots = tl.arange(0, KP)
    tl.store(ids_ptr + row * K + slots, ids, mask=slots < K)
    tl.store(w_ptr + row * K + slots, w, mask=slots < K)


@triton.jit(do_not_specialize=["M"])
def _router_topk(x_ptr, a_ptr, ln_ptr, s_ptr, y_ptr, eps, r_ptr, logits_ptr, count_ptr, ids_ptr, w_ptr, M, E, sx, sa,
                 H: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr,
                 BLOCK_H: tl.constexpr, RENORM: tl.constexpr, NORM: tl.constexpr):
    f32 = tl.float32
    DT = x_ptr.dtype.element_ty
    first = tl.program_id(0) == 0
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    h = tl.arange(0, BLOCK_H)
    ok = (e < E)[:, None] & (h < H)[None, :]
    r = tl.load(r_ptr + e[:, None].to(tl.int64) * H + h[None, :], mask=ok, other=0.0).to(f32)
    for m in range(M):
        x = tl.load(x_ptr + m * sx + h, mask=h < H, other=0.0)
        if NORM:
            # x is the residual stream and a the attention's output: s = x + a as torch adds them,
            # x = RMSNorm(s) as norm_rope_kernel's add_rms_norm computes it; every program computes
            # the row (a few KB from L2), the first keeps s and x
            s = (x.to(f32) + tl.load(a_ptr + m * sa + h, mask=h < H, other=0.0).to(f32)).to(DT)
            sf = s.to(f32)
            x = _weighted(sf, _inv_rms(tl.sum(sf * sf, 0), eps, H), tl.load(ln_ptr + h, mask=h < H, other=0.0), DT, DT)
            if first:
                tl.store(s_ptr + m * H + h, s, mask=h < H)
                tl.store(y_ptr + m * H + h, x, mask=h < H)
        # F.linear's output: the float32 sum rounded to x's dtype
        logit = tl.sum(r * x.to(f32)[None, :], 1).to(DT).to(f32)
        tl.store(logits_ptr + m * E + e, logit, mask=e < E)
    tl.debug_barrier()  # every thread's logits stored before the count says so
    done = tl.atomic_add(count_ptr, 1, sem="acq_rel")
    if done == tl.num_programs(0) - 1:  # the last program: every logit is in
        cols = tl.arange(0, BLOCK)
        slots = tl.arange(0, KP)
        for m in range(M):
            # volatile: from L2, where the other programs' stores are, never a stale L1 line
            x = tl.load(logits_ptr + m * E + cols, mask=cols < E, other=float("-inf"), volatile=True)
            ids, w = _topk_row(x, cols, E, K, KP, BLOCK, RENORM)
            tl.store(ids_ptr + m * K + slots, ids, mask=slots < K)
            tl.store(w_ptr + m * K + slots, w, mask=slots < K)
        tl.store(count_ptr, 0)


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


def fits(x: torch.Tensor, router: torch.Tensor, norm: torch.Tensor | None = None) -> bool:
    """Whether router_topk_triton takes x [M, H] and the router [E, H] (and the norm's weight [H])
    in one kernel."""
    m, hidden = x.shape
    e = router.shape[0]
    return (0 < m <= FUSED_MAX_TOKENS and e <= FUSED_MAX_EXPERTS and triton.next_power_of_2(hidden) <= FUSED_ELEMENTS
            and router.dtype == x.dtype and router.is_contiguous() and x.stride(-1) == 1
            and (norm is None or norm.dtype == x.dtype and norm.shape == (hidden,)))


# router weight -> its programs' count (one per router: two routers' kernels may be in flight at
# once, one router's never, as a stream runs its layers in turn)
_COUNTS: dict[tuple[torch.device, int], torch.Tensor] = {}


def router_topk_triton(x: torch.Tensor, router: torch.Tensor, k: int, renorm: bool,
                       norm: tuple[torch.Tensor, torch.Tensor, float] | None = None):
    """softmax_topk(F.linear(x, router), k, renorm) -> (ids, weights) for x [M, H] and router [E, H]
    where `fits`. With norm = (a, weight, eps): x is the residual stream, and the input of the
    router is layers.add_rms_norm(x, a, weight, eps)'s norm: -> (x + a, that norm, ids, weights)."""
    m, hidden = x.shape
    e = router.shape[0]
    key = (router.device, router.data_ptr())
    count = _COUNTS.get(key)
    if count is None:
        count = _COUNTS[key] = torch.zeros(1, dtype=torch.int32, device=router.device)
    block_h = triton.next_power_of_2(hidden)
    block_e = FUSED_ELEMENTS // block_h
    logits = torch.empty(m, e, dtype=torch.float32, device=x.device)
    ids = torch.empty(m, k, dtype=torch.int64, device=x.device)
    w = torch.empty(m, k, dtype=torch.float32, device=x.device)
    if norm is None:
        a, ln, eps, s, y = x, x, 0.0, x, x
    else:
        a, ln, eps = norm
        a = a.contiguous()
        s, y = torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(x, memory_format=torch.contiguous_format)
    _router_topk[(triton.cdiv(e, block_e),)](
        x, a, ln, s, y, eps, router, logits, count, ids, w, m, e, x.stride(0), a.stride(0), H=hidden, K=k,
        KP=triton.next_power_of_2(k), BLOCK=triton.next_power_of_2(e), BLOCK_E=block_e, BLOCK_H=block_h,
        RENORM=renorm, NORM=norm is not None, num_warps=4,
        enable_fp_fusion=False,  # the norm's roundings are torch's, as norm_rope_kernel's (an fma would round once)
    )
    return (ids, w) if norm is None else (s, y, ids, w)
