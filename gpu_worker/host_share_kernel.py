"""The Triton kernels of the host share (host_share.py), each beside its torch reference there.

split (host_share.split): which of a decode layer's chosen experts the device takes from host memory
and which the CPU pool gets, in one launch of one program (it runs on the turn's path, before the
pool's request is posted: the torch ops of split_reference are ~8 launches).

    chosen   = the distinct ids >= 0                 guessed = the distinct ids of the guess
    key[e]   = guessed[e] * EB + (e + salt) % E      (unguessed first, then a rotation by layer)
    device's = the min((n * s256 + 128) // 256, CAP) chosen experts of smallest key, n = |chosen|
    mine[p]  = ids[p] if ids[p] is the device's else -1;  pool[p] = ids[p] if not, else -1
    slot     = an expert's rank by key among the device's: slots[slot] = e, lookup[e] = slot

gather (host_share.gather): the device's experts copied from a store block in host memory into
their staging slots, `count` rows of ROW words each, by a fixed grid of programs that each take
every G-th of the (slot, chunk) items: a graph's launch whatever the count, and no program launched
for the slots left empty. Each program reads a chunk of BLOCK contiguous words at a time, as a
plain sum does (the GEMV's [32 rows, 128 bytes] tiles read host memory at ~22 GB/s where a sum read
49 on the lent H100, session 36: too few reads in flight for PCIe's latency).

tests/test_host_share.py compares both with their references under Triton's interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_CHUNK = 128  # pairs (or guessed ids) compared against every expert at a time: [EB, 128] per step
_WORDS = 2048  # 4-byte words a gather program copies at a time: 8 KB, four 16-byte loads a thread
_PROGRAMS_PER_SM = 2


@triton.jit
def _split_kernel(IDS, GUESS, MINE, POOL, SLOTS, LOOKUP, COUNT, P, G, E, CAP, salt, S256,
                  EB: tl.constexpr, CHUNK: tl.constexpr):
    s256 = tl.load(S256)  # from memory: a graph's replay takes the level set before it
    e = tl.arange(0, EB)
    c = tl.arange(0, CHUNK)
    chosen = tl.zeros((EB,), tl.int32)
    for start in range(0, P, CHUNK):
        ids = tl.load(IDS + start + c, mask=start + c < P, other=-1)
        chosen += tl.sum((ids[None, :] == e[:, None]).to(tl.int32), axis=1)
    guessed = tl.zeros((EB,), tl.int32)
    for start in range(0, G, CHUNK):
        g = tl.load(GUESS + start + c, mask=start + c < G, other=-1)
        guessed += tl.sum((g[None, :] == e[:, None]).to(tl.int32), axis=1)
    chosen = chosen > 0
    # keys are distinct: a chosen one is below 2 * EB, the others (never taken) above it
    key = tl.where(chosen, (guessed > 0).to(tl.int32) * EB + (e + salt) % E, 2 * EB + e)
    n = tl.sum(chosen.to(tl.int32), axis=0)
    take = tl.minimum((n * s256 + 128) // 256, CAP)
    rank = tl.sum((key[None, :] < key[:, None]).to(tl.int32), axis=1)
    is_taken = chosen & (rank < take)
    mine = is_taken.to(tl.int32)
    tl.store(COUNT, take)
    tl.store(LOOKUP + e, tl.where(is_taken, rank, -1).to(tl.int64), mask=e < E)
    tl.store(SLOTS + rank, e.to(tl.int64), mask=is_taken)
    for start in range(0, CAP, CHUNK):
        tl.store(SLOTS + start + c, tl.full((CHUNK,), -1, tl.int64), mask=(start + c >= take) & (start + c < CAP))
    for start in range(0, P, CHUNK):
        ok = start + c < P
        ids = tl.load(IDS + start + c, mask=ok, other=-1)
        is_mine = tl.sum((ids[:, None] == e[None, :]).to(tl.int32) * mine[None, :], axis=1) > 0
        tl.store(MINE + start + c, tl.where(is_mine, ids, -1), mask=ok)
        tl.store(POOL + start + c, tl.where(is_mine, -1, ids), mask=ok)


def split_triton(ids: torch.Tensor, guess: torch.Tensor | None, s256: torch.Tensor, salt: int, num: int, cap: int):
    """s256: an int32 [1] on the device. -> (mine, pool, slots [cap], lookup [num], count int32 [1])."""
    flat = ids.reshape(-1).contiguous()
    mine, pool = torch.empty_like(flat), torch.empty_like(flat)
    slots = torch.empty(cap, dtype=torch.long, device=flat.device)
    lookup = torch.empty(num, dtype=torch.long, device=flat.device)
    count = torch.empty(1, dtype=torch.int32, device=flat.device)
    g = flat if guess is None else guess.reshape(-1).to(flat.dtype).contiguous()
    _split_kernel[(1,)](flat, g, mine, pool, slots, lookup, count, flat.numel(), 0 if guess is None else g.numel(),
                        num, cap, salt % num, s256, EB=triton.next_power_of_2(num), CHUNK=_CHUNK)
    return mine.view(ids.shape), pool.view(ids.shape), slots, lookup, count


@triton.jit
def _gather_kernel(SRC, DST, SLOTS, ROWS, COUNT, ROW, CHUNKS, BLOCK: tl.constexpr):
    # items p, p + G, ... of the count * CHUNKS (slot, chunk) items; ROWS: the block's row of each
    # expert (-1: another block holds it)
    off = tl.arange(0, BLOCK)
    n = tl.load(COUNT) * CHUNKS
    for item in range(tl.program_id(0), n, tl.num_programs(0)):
        slot = item // CHUNKS
        r = tl.load(ROWS + tl.load(SLOTS + slot))
        if r >= 0:
            o = (item % CHUNKS) * BLOCK + off
            m = o < ROW
            v = tl.load(SRC + r * ROW + o, mask=m)
            tl.store(DST + slot.to(tl.int64) * ROW + o, v, mask=m)


def _words(t: torch.Tensor) -> torch.Tensor:
    """t [E, ...] as [E, row] of 4-byte words (of bytes where a row is not whole words)."""
    flat = t.reshape(t.shape[0], -1).view(torch.uint8)
    return flat.view(torch.int32) if flat.shape[1] % 4 == 0 else flat


def gather_triton(src: torch.Tensor, dst: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor, count: torch.Tensor):
    """dst[s] = src[rows[slots[s]]] for s < count where that row is >= 0."""
    s, d = _words(src), _words(dst)
    row = s.shape[1]
    block = min(_WORDS, triton.next_power_of_2(row))
    programs = _PROGRAMS_PER_SM * (torch.cuda.get_device_properties(src.device).multi_processor_count
                                   if src.is_cuda else 2)
    _gather_kernel[(programs,)](s, d, slots, rows, count, row, triton.cdiv(row, block), BLOCK=block)
