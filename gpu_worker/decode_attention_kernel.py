"""The Triton kernels of decode_attention.py: flash-decoding over the cache as stored.

A launch serves a batch of sequences, each with its own cache (a decode step's every sequence in
one launch per layer, not one per sequence: at 32 sequences the per-sequence launches and their
host code were most of a decode layer's GPU turn). The caches share one layout; each sequence's
tensors are found as element offsets from a fixed anchor of their dtype (cache_rows.offsets: a
table on the device, with the sequences' first query positions), so no sequence's pointer is baked
into the launch, and a launch captured in a CUDA graph serves every later step of its batch size
from that step's table.

Work split: program (g, s, b) takes sequence b's key head g / head_blocks, a block of BLOCK_H of its
query rows (row r = query i * rep + head in the group: every query head of the group and every new
token, so K and V are read once for all of them) and the s-th split of its visible keys [lo, T). It streams
its keys in blocks of BLOCK_N and keeps, per row, the running max m, sum l and unnormalised output
acc (online softmax, base 2). The combine kernel, one program per (query, head) row, merges the
splits that hold keys (after a short context, a few of the launch's) and the sink:

    M = max(max_s m_s, sink),  o = sum_s 2^(m_s - M) acc_s / (sum_s 2^(m_s - M) l_s + 2^(sink - M))

fp8 rows: q . (k * s_k) = (q . k) * s_k, so keys enter the product as they are (e4m3 -> bf16/fp16
is exact) and their scale multiplies the scores; values are dequantized per block in registers.
Products accumulate in float32 (fp32 operands in IEEE, not TF32, for float32 runs).
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
import triton
import triton.language as tl

from .cache_rows import ALIGN as _ALIGN, Rows, anchor, device_table, offsets

LOG2E = 1.4426950408889634
ALIGN = tl.constexpr(_ALIGN)
BLOCK_H = 16  # query rows per program: tl.dot's smallest M


@triton.jit
def _keys(TABLE, b, width, t, splits, window, WINDOWED: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sequence b's visible keys [lo, T), its keys per split (whole blocks), and how many splits
    hold any: the split and combine kernels' one shared account of the work."""
    start = tl.load(TABLE + b * width + width - 1)
    T = start + t
    lo = 0
    if WINDOWED:
        lo = tl.maximum(start + 1 - window, 0)  # no query sees a key before the first one's window
    per = tl.cdiv(tl.cdiv(T - lo, splits), BLOCK_N) * BLOCK_N
    return start, lo, T, per, tl.cdiv(T - lo, per)


@triton.jit(do_not_specialize=["t", "splits"])
def _split_kernel(
    Q, KA, SA, KB, SB, V, SV, TABLE, M, L, ACC,
    sq_t, sq_h, ska_t, ska_h, ssa_t, ssa_h, skb_t, skb_h, ssb_t, ssb_h, sv_t, sv_h, ssv_t, ssv_h,
    t, splits, window, rep, rows, R, Hq, head_blocks, qk_scale, width, IA, IB, IV,
    DA: tl.constexpr, DB: tl.constexpr, DV: tl.constexpr,
    BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    A_FP8: tl.constexpr, B_FP8: tl.constexpr, V_FP8: tl.constexpr, V_IS_A: tl.constexpr, WINDOWED: tl.constexpr,
):
    DT = Q.dtype.element_ty
    b = tl.program_id(2)
    # the sequence's row of the table (cache_rows.offsets): values and scales offsets of each stored
    # part, of which IA, IB and IV are the keys' two parts and the values; its first query's
    # position. Every offset is a multiple of ALIGN elements (cache_rows.element_gap): said so, a
    # thread reads 16 bytes at once, where a pointer from a table is otherwise taken as
    # byte-aligned (fp8 rows were read one byte per load: ~230 GB/s on the H100)
    seq = TABLE + b * width
    KA += tl.multiple_of(tl.load(seq + 2 * IA), ALIGN)
    SA += tl.multiple_of(tl.load(seq + 2 * IA + 1), ALIGN)
    if DB > 0:
        KB += tl.multiple_of(tl.load(seq + 2 * IB), ALIGN)
        SB += tl.multiple_of(tl.load(seq + 2 * IB + 1), ALIGN)
    V += tl.multiple_of(tl.load(seq + 2 * IV), ALIGN)
    SV += tl.multiple_of(tl.load(seq + 2 * IV + 1), ALIGN)
    start, lo, T, keys_per_split, _ = _keys(TABLE, b, width, t, splits, window, WINDOWED, BLOCK_N)
    kh = tl.program_id(0) // head_blocks
    r = (tl.program_id(0) % head_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = r < rows
    i = r // rep
    head = kh * rep + r % rep
    qpos = start + i
    q_row = Q + (b * t + i) * sq_t + head * sq_h
    da = tl.arange(0, BLOCK_DA)
    qa = tl.load(q_row[:, None] + da[None, :], mask=row_ok[:, None] & (da[None, :] < DA), other=0.0)
    if DB > 0:
        db = tl.arange(0, BLOCK_DB)
        qb = tl.load(q_row[:, None] + DA + db[None, :], mask=row_ok[:, None] & (db[None, :] < DB), other=0.0)
    dv = tl.arange(0, BLOCK_DV)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    k_lo = lo + tl.program_id(1) * keys_per_split
    k_hi = tl.minimum(k_lo + keys_per_split, T)
    for n0 in range(k_lo, k_hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < k_hi
        ka = tl.load(KA + n[:, None] * ska_t + kh * ska_h + da[None, :], mask=n_ok[:, None] & (da[None, :] < DA), other=0.0)
        s = tl.dot(qa, tl.trans(ka.to(DT)), input_precision="ieee")
        if A_FP8:
            sa = tl.load(SA + n * ssa_t + kh * ssa_h, mask=n_ok, other=0.0)
            s = s * sa[None, :]
        if DB > 0:
            kb = tl.load(KB + n[:, None] * skb_t + kh * skb_h + db[None, :], mask=n_ok[:, None] & (db[None, :] < DB), other=0.0)
            sb = tl.dot(qb, tl.trans(kb.to(DT)), input_precision="ieee")
            if B_FP8:
                sb = sb * tl.load(SB + n * ssb_t + kh * ssb_h, mask=n_ok, other=0.0)[None, :]
            s = s + sb
        seen = (n[None, :] <= qpos[:, None]) & n_ok[None, :]
        if WINDOWED:
            seen = seen & (n[None, :] > qpos[:, None] - window)
        s = tl.where(seen, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen no key yet (a later query's keys, or outside its window) stays at
        # -inf; subtracting 0 instead keeps 2^(-inf - -inf) from making NaNs
        base = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - base[:, None])
        alpha = tl.exp2(m_i - base)
        l_i = l_i * alpha + tl.sum(p, 1)
        if V_IS_A:
            v = ka  # MLA: the values are the latent part of the keys, already loaded
        else:
            v = tl.load(V + n[:, None] * sv_t + kh * sv_h + dv[None, :], mask=n_ok[:, None] & (dv[None, :] < DV), other=0.0)
        if V_FP8:
            if V_IS_A:
                vs = sa
            else:
                vs = tl.load(SV + n * ssv_t + kh * ssv_h, mask=n_ok, other=0.0)
            v = v.to(tl.float32) * vs[:, None]
        acc = acc * alpha[:, None] + tl.dot(p.to(DT), v.to(DT), input_precision="ieee")
        m_i = m_new

    # a split past the sequence's keys (a short context's most) writes nothing: the combine reads the
    # `active` ones only. A row of an active split that saw no key of its own (a later query's, or one
    # outside its window) has m = -inf, l = 0, which the combine weighs 0.
    out = (b * splits + tl.program_id(1)) * R + i * Hq + head
    ok = r < tl.where(k_lo < T, rows, 0)  # row_ok, and none in a split past the keys (not `active`: _keys)
    tl.store(M + out, m_i, mask=ok)
    tl.store(L + out, l_i, mask=ok)
    tl.store(ACC + out[:, None] * DV + dv[None, :], acc, mask=ok[:, None] & (dv[None, :] < DV))


@triton.jit(do_not_specialize=["t", "splits"])
def _combine_kernel(M, L, ACC, SINKS, O, TABLE, width, t, splits, window, R, Hq, sink_scale,
                    DV: tl.constexpr, BLOCK_DV: tl.constexpr, CHUNK: tl.constexpr, HAS_SINKS: tl.constexpr,
                    WINDOWED: tl.constexpr, BLOCK_N: tl.constexpr):
    # CHUNK splits per load, not one split at a time: a row has ~50-150 splits, and a loop of
    # dependent single loads would wait on memory once per split. Only the splits that hold keys
    # (_keys): after a short context, a few of the ~66 a graph's launch was sized for.
    row = tl.program_id(0)
    b = tl.program_id(1)
    splits_used = _keys(TABLE, b, width, t, splits, window, WINDOWED, BLOCK_N)[4]
    M += b * splits * R
    L += b * splits * R
    ACC += b * splits * R * DV
    d = tl.arange(0, BLOCK_DV)
    c = tl.arange(0, CHUNK)
    top = tl.full([CHUNK], float("-inf"), tl.float32)
    for s0 in range(0, splits_used, CHUNK):
        top = tl.maximum(top, tl.load(M + (s0 + c) * R + row, mask=s0 + c < splits_used, other=float("-inf")))
    top = tl.max(top, 0)
    if HAS_SINKS:
        sink = tl.load(SINKS + row % Hq).to(tl.float32) * sink_scale
        top = tl.maximum(top, sink)
    den = tl.zeros([CHUNK], tl.float32)
    acc = tl.zeros([CHUNK, BLOCK_DV], tl.float32)
    for s0 in range(0, splits_used, CHUNK):
        s = s0 + c
        ok = s < splits_used
        # a split that saw no key of this row has m = -inf: weight 0
        w = tl.exp2(tl.load(M + s * R + row, mask=ok, other=float("-inf")) - top)
        den += w * tl.load(L + s * R + row, mask=ok, other=0.0)
        acc += w[:, None] * tl.load(ACC + (s[:, None] * R + row) * DV + d[None, :], mask=ok[:, None] & (d[None, :] < DV), other=0.0)
    total = tl.sum(den, 0)
    if HAS_SINKS:
        total += tl.exp2(sink - top)
    tl.store(O + (b * R + row) * DV + d, (tl.sum(acc, 0) / total).to(O.dtype.element_ty), mask=d < DV)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # Triton's interpreter runs the programs one after another
    return torch.cuda.get_device_properties(device).multi_processor_count


def _tiles(width: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for a key head dim: wider rows (256; MLA's [512 ; 64]) take fewer keys
    per block and more warps, so that q, the key block and acc fit in registers (ptxas for sm_90:
    at most ~140 per thread, no spills, for d = 64, 128, 256 and 576)."""
    return (64, 4) if width <= 128 else (32, 8)


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot's smallest K and N


def decode_attention_batch(
    q: torch.Tensor,
    ks: Sequence[Sequence[Rows]],
    vs: Sequence[Rows],
    starts: Sequence[int],
    scale: float,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
    splits: int | None = None,
    out: torch.Tensor | None = None,
    table: tuple[torch.Tensor, int, tuple[int, int, int]] | None = None,
    tiles: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """decode_attention for B sequences at once: q [B * t, Hq, dk] holds t new queries of each, one
    sequence after another; ks[b], vs[b] and starts[b] are sequence b's key parts, values and first
    query's position. K has one or two parts; v may be k[0] itself (MLA: read once, as keys and as
    values) or any rows, a view into K's included; every sequence's rows have the first's layout.
    `table`: (cache_rows.offsets of the sequences' stored parts on q's device, its width per
    sequence, the indices among those parts of the keys' first and second and of the values), when
    the caller copied it already (KVCache copies one table for a whole step); else made here. `splits` (of each sequence's keys): None is about two
    programs per SM whatever the lengths, so that a launch captured in a CUDA graph serves every
    later step. `out`: a contiguous [B * t, Hq, dv] to write to. `tiles`: (keys per block, warps,
    pipeline stages) instead of _tiles' choice (benchmarks/device_check.py times a few)."""
    B = len(ks)
    if not B or len(vs) != B or len(starts) != B or q.shape[0] % B:
        raise ValueError(f"{q.shape[0]} queries for {B} sequences ({len(vs)} values, {len(starts)} starts)")
    k0, v0 = ks[0], vs[0]
    if len(k0) not in (1, 2):
        raise ValueError(f"keys come in one or two parts, got {len(k0)}")
    ka, kb = k0[0], (k0[1] if len(k0) == 2 else None)
    t, (Hq, dk) = q.shape[0] // B, q.shape[1:]
    Hkv, DA = ka.values.shape[1:]
    DB, DV = (kb.values.shape[-1] if kb else 0), v0.values.shape[-1]
    v_is_a = v0 is ka

    def layout(r: Rows | None):
        return None if r is None else (r.values.dtype, r.values.shape[1:], r.values.stride(),
                                       None if r.scales is None else (r.scales.shape[1:], r.scales.stride()))

    for kk, vv, st in zip(ks, vs, starts):
        if len(kk) != len(k0) or any(layout(a) != layout(b) for a, b in zip((*kk, vv), (*k0, v0))) or (vv is kk[0]) != v_is_a:
            raise ValueError("every sequence's cached rows must have the first sequence's layout")
        if dk != DA + DB or Hq % Hkv or kk[0].values.shape[0] != st + t:
            raise ValueError(f"q {list(q.shape)} against keys [{kk[0].values.shape[0]}, {Hkv}, {DA}+{DB}] from position {st}")
    if any(p.values.stride(-1) != 1 for p in (*k0, v0)):
        raise ValueError("cached rows must be contiguous along the head dim")
    q, rep = q.contiguous(), Hq // Hkv
    rows, R = t * rep, t * Hq
    head_blocks = triton.cdiv(rows, BLOCK_H)
    BLOCK_N, warps, stages = tiles or (*_tiles(dk), None)
    if splits is None:
        splits = max(1, triton.cdiv(2 * _sm_count(q.device), Hkv * head_blocks * B))
    if table is None:
        stored = [[(r.values, r.scales) for r in ([*kk] if v_is_a else [*kk, vv])] for kk, vv in zip(ks, vs)]
        table = (device_table(offsets(stored, starts), q.device), 2 * len(stored[0]) + 1,
                 (0, 1, 0 if v_is_a else len(k0)))
    data, width, (IA, IB, IV) = table

    def bases(p: Rows | None):
        """The anchors of a part's values and scales (stand-ins, never read, for what is absent)."""
        p = p or ka
        values = anchor(p.values.dtype, q.device)
        return values, values if p.scales is None else anchor(torch.float32, q.device)

    def strides(p: Rows | None):
        if p is None:
            return 0, 0, 0, 0
        s = p.values if p.scales is None else p.scales
        return p.values.stride(0), p.values.stride(1), s.stride(0), s.stride(1)

    f32 = dict(dtype=torch.float32, device=q.device)
    m, l, acc = torch.empty(B, splits, R, **f32), torch.empty(B, splits, R, **f32), torch.empty(B, splits, R, DV, **f32)
    _split_kernel[(Hkv * head_blocks, splits, B)](
        q, *bases(ka), *bases(kb), *bases(v0), data, m, l, acc,
        q.stride(0), q.stride(1), *strides(ka), *strides(kb), *strides(v0),
        t, splits, window or 0, rep, rows, R, Hq, head_blocks, scale * LOG2E, width, IA, IB, IV,
        DA=DA, DB=DB, DV=DV, BLOCK_DA=_pow2(DA), BLOCK_DB=_pow2(DB) if DB else 1, BLOCK_DV=_pow2(DV),
        BLOCK_N=BLOCK_N, BLOCK_H=BLOCK_H, A_FP8=ka.scales is not None, B_FP8=kb is not None and kb.scales is not None,
        V_FP8=v0.scales is not None, V_IS_A=v_is_a, WINDOWED=window is not None, num_warps=warps,
        **({} if stages is None else {"num_stages": stages}),
    )
    if out is None:
        out = torch.empty(B * t, Hq, DV, dtype=q.dtype, device=q.device)
    _combine_kernel[(R, B)](m, l, acc, m if sinks is None else sinks, out, data, width, t, splits, window or 0, R, Hq, LOG2E,
                            DV=DV, BLOCK_DV=_pow2(DV), CHUNK=max(1, 4096 // _pow2(DV)), HAS_SINKS=sinks is not None,
                            WINDOWED=window is not None, BLOCK_N=BLOCK_N)
    return out
