"""The CPU pool's routed-expert kernel: one call per layer for a batch of M decode tokens.

    out[t] = sum_j w[t, j] * W2_e (silu(W_gate,e x_t) * W_up,e x_t),   e = ids[t, j] in this block

layer_kernel binds a layer's block of experts to the C kernel (expert_kernel.c, built for this CPU at
first use by native.py; moe_layer is the same work in one call for tests and benchmarks), which
also covers gpt-oss's clamped activation and expert biases; for INT4 experts and bf16 x (decode on
the GPU workers' dtype) it quantizes the activations to int8 per group and takes integer dot
products (shared/moe.py:moe_reference_q8 is that arithmetic's reference), float32 x keeping the
scheme's weight-only arithmetic. Where it cannot be built (no compiler, a CPU without AVX2) it warns
once and runs the numba kernel below, which is also kept as the C kernel's second opinion in tests
and benchmarks. The numba kernel is described from here on.

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

import logging
import os
import subprocess

import numba
import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import intrinsic

from ..shared.expert_store import ExpertFormat
from ..shared.moe import moe_reference
from . import native

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


_threads = len(os.sched_getaffinity(0))
_c_kernel: native.CKernel | None | bool = None  # None: not tried yet; False: could not be built


def c_kernel() -> native.CKernel | None:
    """The C kernel, built or loaded on first call; None (after one warning) where it cannot be."""
    global _c_kernel
    if _c_kernel is None:
        try:
            _c_kernel = native.load()
        except (native.BuildError, OSError, subprocess.SubprocessError) as e:
            logging.getLogger("krasis.cpu_worker").warning("C expert kernel unavailable, using the numba kernel: %s", e)
            _c_kernel = False
    return _c_kernel or None


def kernel_clock() -> dict:
    """The C kernel's clock since the last read (native.CKernel.clock), {} where it was never loaded."""
    return _c_kernel.clock() if _c_kernel else {}


def pin_threads(cpus: list[int]) -> bool:
    """Pin the C kernel's threads (set_threads's count), thread i to cpus[i], where it is loaded and
    there is a CPU for each (the pool process's cores); whether they were pinned. A host that refuses
    (a cpuset narrower than the mask) leaves them unpinned, with a warning: they run as before."""
    if not _c_kernel or len(cpus) != _threads:
        return False
    try:
        _c_kernel.pin(cpus)
    except OSError as e:
        logging.getLogger("krasis.cpu_worker").warning("kernel threads left unpinned: %s", e)
        return False
    return True


def layer_kernel(t: dict[str, torch.Tensor], fmt: ExpertFormat, first: int, count: int, act: str = "silu",
                 kernel: str = "auto"):
    """The routed-expert work of one block of a layer, bound once (the pool binds each layer's at
    start): run(x, ids, weights, out) writes the float32 partial sum [M, H] of x [M, H] over experts
    [first, first + count), whose tensors are `t`, into out, and returns how many (token, choice)
    pairs were the block's (the pool's share of the routing). `kernel`: "c", "numba", or "auto" (C if
    it could be built, else numba). What neither covers (dense stores, INT4 with odd groups; for
    numba also gptoss and biases) runs moe_reference."""
    reference = lambda x, ids, w: moe_reference(x, ids, w, t, fmt, first, count, act)  # noqa: E731
    if fmt.kind == "dense":
        return _into(reference, first, count)
    bits = {"int4": 4, "int8": 8}[fmt.kind]
    c = c_kernel() if kernel in ("auto", "c") else None
    if kernel == "c" and c is None:
        raise RuntimeError("the C expert kernel could not be built (see the warning above)")
    if c is not None:
        return c.bind(t, bits, first, count, act, _threads) or _into(reference, first, count)
    if act != "silu" or "b13" in t or not _even_int4_groups(fmt, t):
        return _into(reference, first, count)

    def numba_layer(x, ids, weights):
        local = (ids.long() - first).numpy()
        active, off, tok, slot = _route(local, count)
        out = np.zeros(x.shape, np.float32)
        if active.shape[0]:
            _layer(
                x.float().contiguous().numpy(), weights.float().contiguous().numpy(), active, off, tok, slot,
                t["w13.q"].numpy(), _u16(t["w13.s"]), t["w2.q"].numpy(), _u16(t["w2.s"]), bits, out,
            )
        return torch.from_numpy(out)

    return _into(numba_layer, first, count)


def _into(fn, first: int, count: int):
    """layer_kernel's call for a path that returns its result as a new tensor."""
    def run(x, ids, weights, out):
        out.copy_(fn(x, ids, weights))
        return int(((ids >= first) & (ids < first + count)).sum())

    return run


def moe_layer(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    t: dict[str, torch.Tensor],
    fmt: ExpertFormat,
    first: int,
    count: int,
    act: str = "silu",
    kernel: str = "auto",
) -> torch.Tensor:
    """Same contract as shared/moe.py:moe_reference: x [M, H], ids [M, k], weights [M, k] -> the
    partial sum [M, H] in x's dtype (rounded once, from float32) over experts [first, first + count)
    whose tensors are `t`; layer_kernel's work in one call."""
    out = torch.empty(x.shape, dtype=torch.float32)
    layer_kernel(t, fmt, first, count, act, kernel)(x.contiguous(), ids, weights, out)
    return out.to(x.dtype)


def _even_int4_groups(fmt: ExpertFormat, t: dict[str, torch.Tensor]) -> bool:
    """The kernels read INT4 a whole byte (two weights) at a time, so a group must not end inside one
    (the C kernel checks this itself)."""
    if fmt.kind != "int4":
        return True
    return all(t[f"{n}.q"].shape[2] % t[f"{n}.s"].shape[2] == 0 for n in ("w13", "w2"))


def set_threads(n: int) -> None:
    """Threads of the kernels (the pool process's pinned cores)."""
    global _threads
    _threads = max(1, n)
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))


def warm_up(run, hidden: int, first: int) -> None:
    """Compile what runs at first call (numba's kernel; the C kernel is built when bound) and fault
    in the scratch buffers before the first decode step waits on them: one token through a layer
    kernel's first expert."""
    run(torch.zeros(1, hidden), torch.tensor([[first]], dtype=torch.int32), torch.ones(1, 1),
        torch.empty(1, hidden))
