"""The numba kernel of the CPU pool's routed experts: what runs where the C kernel (expert_kernel.c)
cannot be built, and its second opinion in tests and benchmarks (expert_kernel.py binds either).

It reads the store's quantized layout as it is (shared/quant.py: INT4 as two nibbles per byte,
value + 8, low nibble first; INT8 as int8; bf16 scales per group of g along K), so the one copy in
shared memory that the GPU workers DMA from also feeds this kernel: no kernel-specific repacking.
(torch's `_weight_int4pack_mm_for_cpu` would need its own blocked layout, a second copy, and costs
one operator dispatch per expert and matrix, which at M = 1 takes longer than reading the weights.)

Arithmetic is the scheme's exactly: w = q * scale with q the signed integer, products summed in
float32 per group, times the group's scale, summed in float32 over groups. Only the summation order
differs from shared/moe.py:moe_reference (fastmath lets LLVM vectorise the reductions), so float32
results match it to rounding, and bf16 inputs are widened to float32 first.

Work is grouped by expert: the tokens that chose an expert are gathered, and each weight row is
read from DRAM once and applied to all of them while it sits in L1. Two parallel phases per call
(numba prange over the pool process's pinned threads):
  1. (expert, block of I rows): gate and up rows together -> act[p, :] for every assignment p;
  2. block of H output rows: for every active expert, down rows . act[p] -> out[token(p)] (each
     output row is owned by one work item, so no atomics).
Dense stores (bf16/fp32) and activations other than SiLU, or experts with biases, take the plain
grouped path of moe_reference.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import intrinsic


ROWS = 16  # rows per work item: enough work to amortise scheduling, enough items for 16+ threads


@intrinsic
def _u32_as_f32(typingctx, u):
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return sig, codegen


@njit(inline="always")
def _bf16(s):
    return _u32_as_f32(np.uint32(s) << np.uint32(16))


@njit(fastmath=True, inline="always")
def _dot4(q, s, xe, xd, xs):
    """One INT4 row (uint8 [K/2]) . x, given x as prepared by _prep: with f the byte and hi its high
    nibble, lo * x_even + hi * x_odd = f * x_even + hi * (x_odd - 16 x_even), which LLVM vectorises
    as one widening conversion, a floor and two FMAs per byte; the -8 offsets come back per group
    through xs = 8 * (sum of the group's x)."""
    gb = q.shape[0] // s.shape[0]
    total = np.float32(0.0)
    for gi in range(s.shape[0]):
        qg, eg, dg = q[gi * gb : (gi + 1) * gb], xe[gi * gb : (gi + 1) * gb], xd[gi * gb : (gi + 1) * gb]
        acc = np.float32(0.0)
        for j in range(gb):
            f = np.float32(qg[j])
            acc += f * eg[j] + np.floor(f * np.float32(0.0625)) * dg[j]
        total += (acc - xs[gi]) * _bf16(s[gi])
    return total


@njit(fastmath=True, inline="always")
def _dot8(q, s, x):
    gb = q.shape[0] // s.shape[0]
    total = np.float32(0.0)
    for gi in range(s.shape[0]):
        qg, xg = q[gi * gb : (gi + 1) * gb], x[gi * gb : (gi + 1) * gb]
        acc = np.float32(0.0)
        for j in range(gb):
            acc += np.float32(qg[j]) * xg[j]
        total += acc * _bf16(s[gi])
    return total


@njit(fastmath=True, inline="always")
def _dot(q, s, xp, xs, bits):
    if bits == 4:
        return _dot4(q, s, xp[0], xp[1], xs)
    return _dot8(q, s, xp[0])


@njit(cache=True, fastmath=True)
def _prep(x, bits, groups):
    """x [N, K] -> (planes, group sums) for _dot: INT4 [N, 2, K/2] (x_even, x_odd - 16 x_even) and
    8 * per-group sums [N, groups]; INT8 [N, 1, K] as is."""
    n, k = x.shape
    if bits == 4:
        planes = np.empty((n, 2, k // 2), np.float32)
        sums = np.zeros((n, groups), np.float32)
        gb = k // 2 // groups
        for t in range(n):
            for j in range(k // 2):
                e, o = x[t, 2 * j], x[t, 2 * j + 1]
                planes[t, 0, j] = e
                planes[t, 1, j] = o - np.float32(16.0) * e
                sums[t, j // gb] += np.float32(8.0) * (e + o)
        return planes, sums
    return x.reshape(n, 1, k).copy(), np.zeros((n, groups), np.float32)


@njit(cache=True)
def _route(local, count):
    """Assignments grouped by expert: active experts, offsets into (token, slot) lists."""
    m, k = local.shape
    cnt = np.zeros(count + 1, np.int64)
    for t in range(m):
        for j in range(k):
            e = local[t, j]
            if 0 <= e < count:
                cnt[e + 1] += 1
    start = np.cumsum(cnt)
    fill = start[:-1].copy()
    tok = np.empty(start[-1], np.int64)
    slot = np.empty(start[-1], np.int64)
    for t in range(m):
        for j in range(k):
            e = local[t, j]
            if 0 <= e < count:
                tok[fill[e]] = t
                slot[fill[e]] = j
                fill[e] += 1
    active = np.nonzero(cnt[1:])[0]
    off = np.empty(active.shape[0] + 1, np.int64)
    off[0] = 0
    for a in range(active.shape[0]):
        off[a + 1] = start[active[a] + 1]
    return active, off, tok, slot


@njit(parallel=True, cache=True, fastmath=True)
def _layer(x, weights, active, off, tok, slot, q13, s13, q2, s2, bits, out):
    inter, hidden = q13.shape[1] // 2, q2.shape[1]
    xp, xs = _prep(x, bits, s13.shape[2])
    act = np.empty((tok.shape[0], inter), np.float32)
    nb1 = (inter + ROWS - 1) // ROWS
    for it in prange(active.shape[0] * nb1):
        a, r0 = it // nb1, (it % nb1) * ROWS
        e = active[a]
        for r in range(r0, min(r0 + ROWS, inter)):
            for p in range(off[a], off[a + 1]):
                t = tok[p]
                g = _dot(q13[e, r], s13[e, r], xp[t], xs[t], bits)
                u = _dot(q13[e, inter + r], s13[e, inter + r], xp[t], xs[t], bits)
                act[p, r] = g / (np.float32(1.0) + np.exp(-g)) * u
    ap, as_ = _prep(act, bits, s2.shape[2])
    nb2 = (hidden + ROWS - 1) // ROWS
    for it in prange(nb2):
        h0 = it * ROWS
        for a in range(active.shape[0]):
            e = active[a]
            for h in range(h0, min(h0 + ROWS, hidden)):
                for p in range(off[a], off[a + 1]):
                    t = tok[p]
                    out[t, h] += weights[t, slot[p]] * _dot(q2[e, h], s2[e, h], ap[p], as_[p], bits)


def _u16(s: torch.Tensor) -> np.ndarray:
    return s.view(torch.int16).numpy().view(np.uint16)


def set_threads(n: int) -> None:
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))


def layer(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, t: dict[str, torch.Tensor], bits: int,
          first: int, count: int, threads: int) -> torch.Tensor:
    """float32 [M, H]: the SiLU experts [first, first + count) (tensors `t`, INT4 or INT8) for x."""
    set_threads(threads)
    local = (ids.long() - first).numpy()
    active, off, tok, slot = _route(local, count)
    out = np.zeros(x.shape, np.float32)
    if active.shape[0]:
        _layer(
            x.float().contiguous().numpy(), weights.float().contiguous().numpy(), active, off, tok, slot,
            t["w13.q"].numpy(), _u16(t["w13.s"]), t["w2.q"].numpy(), _u16(t["w2.s"]), bits, out,
        )
    return torch.from_numpy(out)
