"""The Triton kernel of host_share.split: which of a decode layer's chosen experts the device reads
from host memory itself and which the CPU pool gets, in one launch of one program (it runs on the
turn's path, before the pool's request is posted: the torch ops of split_reference are ~8 launches).

    chosen   = the distinct ids >= 0                 guessed = the distinct ids of the guess
    key[e]   = guessed[e] * EB + (e + salt) % E      (unguessed first, then a rotation by layer)
    device's = the (n * s256 + 128) // 256 chosen experts of smallest key, n = |chosen|
    mine[p]  = ids[p] if ids[p] is the device's else -1;  pool[p] = ids[p] if not, else -1

tests/test_host_share.py compares it with host_share.split_reference under Triton's interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_CHUNK = 128  # pairs (or guessed ids) compared against every expert at a time: [EB, 128] per step


@triton.jit
def _split_kernel(IDS, GUESS, MINE, POOL, P, G, E, salt, S256, EB: tl.constexpr, CHUNK: tl.constexpr):
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
    take = (n * s256 + 128) // 256
    rank = tl.sum((key[None, :] < key[:, None]).to(tl.int32), axis=1)
    mine = (chosen & (rank < take)).to(tl.int32)
    for start in range(0, P, CHUNK):
        ok = start + c < P
        ids = tl.load(IDS + start + c, mask=ok, other=-1)
        is_mine = tl.sum((ids[:, None] == e[None, :]).to(tl.int32) * mine[None, :], axis=1) > 0
        tl.store(MINE + start + c, tl.where(is_mine, ids, -1), mask=ok)
        tl.store(POOL + start + c, tl.where(is_mine, -1, ids), mask=ok)


def split_triton(ids: torch.Tensor, guess: torch.Tensor | None, s256: torch.Tensor, salt: int, num: int):
    """s256: an int32 [1] on the device."""
    flat = ids.reshape(-1).contiguous()
    mine, pool = torch.empty_like(flat), torch.empty_like(flat)
    g = flat if guess is None else guess.reshape(-1).to(flat.dtype).contiguous()
    _split_kernel[(1,)](flat, g, mine, pool, flat.numel(), 0 if guess is None else g.numel(), num, salt % num, s256,
                        EB=triton.next_power_of_2(num), CHUNK=_CHUNK)
    return mine.view(ids.shape), pool.view(ids.shape)
