"""The Triton kernel behind layers.attend for a prompt chunk on CUDA: flash attention (online
softmax over key blocks, nothing of size t x T in memory) of t new queries at positions
start..start+t-1 over all T = start + t keys, causal from the bottom right, with the GQA broadcast
read in place (query head h reads KV head h // rep: no copies of the KV heads), and gpt-oss's
sliding window and sinks (a per-head logit in the softmax's sum with no value):

    o[i, h] = sum_j p[i, j] v[j, h // rep],  p[i, :] = softmax_j (scale * q[i, h] . k[j, h // rep])
              over start+i-window < j <= start+i (no lower bound without a window), sink included

Why not F.scaled_dot_product_attention: on the H100 its flash kernel (FlashAttention-2) ran a
4096-token chunk over 8K-10K keys at ~300 TFLOP/s (0.9-1.3 ms a layer: the largest GPU cost of a
10K-token prompt after the expert copies), and its cuDNN kernel, ~530 TFLOP/s, builds an execution
plan for every new shape (0.1-0.4 s each), which a service's prompt lengths never stop bringing.
Triton compiles once per head size. A query block's keys split in two loops: those every query of
the block sees (no mask), then the block's diagonal (masked), so the mask costs only there.

The reference is the torch path layers.attend takes elsewhere (tests/test_prefill_attention_kernel.py
compares them under Triton's interpreter; benchmarks/device_check.py compiled, and times both).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _attend_block(acc, m_i, l_i, q, k_ptrs, v_ptrs, n0, n1, qpos, T, sk, sv, qk_scale, window,
                  MASKED: tl.constexpr, WINDOW: tl.constexpr, BN: tl.constexpr):
    # keys n0..n1-1 (multiples of BN) into the running max m_i, sum l_i and output acc
    offs_n = tl.arange(0, BN)
    for n in range(n0, n1, BN):
        kpos = n + offs_n
        if MASKED:
            k = tl.load(k_ptrs + n * sk, mask=(kpos < T)[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs + n * sk)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # [BM, BN] float32, in log2 units (exp2 below)
        if MASKED:
            seen = kpos[None, :] <= qpos[:, None]
            if WINDOW:
                seen = seen & (kpos[None, :] > qpos[:, None] - window)
            s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen no key yet (a sliding window's lower edge) keeps its zeros, not NaN
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs + n * sv, mask=(kpos < T)[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs + n * sv)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, m_i, l_i


# one compilation whatever the lengths: Triton would otherwise compile a variant per pattern of
# lengths divisible by 16 (or equal to 1), and a new prompt length would wait for it
@triton.jit(do_not_specialize=["t", "T", "start", "window"])
def _prefill_attention_kernel(Q, K, V, O, SINKS, sq, sqh, sk, skh, sv, svh, so, soh, t, T, start, qk_scale, window,
                              REP: tl.constexpr, D: tl.constexpr, HAS_SINKS: tl.constexpr, WINDOW: tl.constexpr,
                              BM: tl.constexpr, BN: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    hk = h // REP
    offs_m = pid * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BN)
    rows = offs_m < t
    q = tl.load(Q + offs_m[:, None].to(tl.int64) * sq + h * sqh + offs_d[None, :], mask=rows[:, None], other=0.0)
    qpos = start + offs_m
    k_ptrs = K + offs_n[:, None].to(tl.int64) * sk + hk * skh + offs_d[None, :]
    v_ptrs = V + offs_n[:, None].to(tl.int64) * sv + hk * svh + offs_d[None, :]
    if HAS_SINKS:
        # the sink joins the softmax as one more logit with no value: exp(sink) in the sum alone
        m_i = tl.full([BM], 0.0, tl.float32) + tl.load(SINKS + h).to(tl.float32) * 1.4426950408889634
        l_i = tl.full([BM], 1.0, tl.float32)
    else:
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    end = tl.minimum(start + (pid + 1) * BM, T)
    first = start + pid * BM
    if WINDOW:
        # the block's keys: from the first its first query sees to its last query's own, all masked
        lo = tl.maximum(first - window + 1, 0) // BN * BN
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_ptrs, v_ptrs, lo, end, qpos, T, sk, sv, qk_scale, window,
                                      True, True, BN)
    else:
        # every query of the block sees the keys below its first position: no mask there
        seen_by_all = first // BN * BN
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_ptrs, v_ptrs, 0, seen_by_all, qpos, T, sk, sv, qk_scale, window,
                                      False, False, BN)
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_ptrs, v_ptrs, seen_by_all, end, qpos, T, sk, sv, qk_scale, window,
                                      True, False, BN)
    out = acc / l_i[:, None]
    tl.store(O + offs_m[:, None].to(tl.int64) * so + h * soh + offs_d[None, :], out.to(O.dtype.element_ty), mask=rows[:, None])


def prefill_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                             sliding_window: int | None = None, sinks: torch.Tensor | None = None,
                             block_m: int = 128, block_n: int = 64, num_warps: int = 8, num_stages: int = 3) -> torch.Tensor:
    """q [t, Hq, d], k and v [T, Hkv, d] (T >= t, the chunk's keys last), d a power of two ->
    [t, Hq, d]: layers.attend for a prompt chunk, with its sliding window and sinks (gpt-oss)."""
    t, hq, d = q.shape
    T, hkv = k.shape[0], k.shape[1]
    out = torch.empty_like(q)
    if t == 0:
        return out
    q, k, v = (a if a.stride(-1) == 1 else a.contiguous() for a in (q, k, v))
    grid = (triton.cdiv(t, block_m), hq)
    _prefill_attention_kernel[grid](
        q, k, v, out, sinks if sinks is not None else q, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), out.stride(0), out.stride(1), t, T, T - t, scale * LOG2E, sliding_window or 0,
        REP=hq // hkv, D=d, HAS_SINKS=sinks is not None, WINDOW=sliding_window is not None, BM=block_m, BN=block_n,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
