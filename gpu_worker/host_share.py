"""The device's share of the CPU pool's decode work: some of a layer's chosen experts read by the
device itself from the host store over PCIe, while the pool computes the rest.

Why: a decode layer through the pool reads its chosen experts from DRAM with the pool's threads. On
the lent H100 hosts those 14 threads read 106-113 GB/s where the DRAM gave a sum over every core up to
141 (BENCHMARKS.md, session 35): a core keeps only so many reads in flight, so the pool alone leaves
DRAM bandwidth unused. The store is page-locked and mapped into the device's address space
(dma.HostExperts), so the device's expert products (moe_pairs: the decode GEMV) can read its experts
where they are, over PCIe, with no copy, no staging and nothing on the host's path: a launch in the
decode graph like the hot share's. Splitting a layer's choices between the two readers, the layer
costs about the longer of the two shares instead of the pool's whole; what that buys depends on how
the DRAM serves both at once (benchmarks/dram_share.py measures it).

Which experts: of the distinct experts a layer's tokens chose for the pool, `share` of them (rounded)
go to the device, first those the pool's lookahead did not read ahead (the guess the device posted
for this layer: cpu_worker/lookahead.py), so the pool keeps the experts already in its caches; then by
a rotation of the expert ids that moves with the layer. An expert goes to one side for every token
of the step, so no expert is read twice. The choice depends on this layer's ids and guess only, so a
graph's replay makes the eager step's.
"""

from __future__ import annotations

import torch

from .dma import HostExperts
from .moe_gpu import moe_pairs


def auto_share(device: torch.device) -> float:
    """--pcie-share's default: none yet (off) until measured on the GPU machine."""
    return 0.0


def split_reference(ids: torch.Tensor, guess: torch.Tensor | None, s256: int, salt: int, num: int):
    """(mine, pool), each like ids [M, k]: the choices whose expert the device takes, and the rest
    (-1 elsewhere; ids of -1, choices that are no one's here, stay -1 in both). The device takes
    (n * s256 + 128) // 256 of the n distinct experts chosen: those the guess did not name first, then
    by (e + salt) % num."""
    flat = ids.reshape(-1)
    chosen = torch.zeros(num, dtype=torch.bool)
    chosen[flat[flat >= 0].cpu()] = True
    guessed = torch.zeros(num, dtype=torch.bool)
    if guess is not None:
        g = guess.reshape(-1).cpu()
        guessed[g[g >= 0]] = True
    e = torch.arange(num)
    key = guessed.long() * num + (e + salt) % num
    candidates = e[chosen]
    take = (len(candidates) * s256 + 128) // 256
    taken = torch.zeros(num, dtype=torch.bool)
    taken[candidates[key[chosen].argsort()][:take]] = True
    is_mine = (ids >= 0) & taken.to(ids.device)[ids.clamp(min=0)]
    return torch.where(is_mine, ids, -1), torch.where(is_mine, -1, ids)


def split(ids: torch.Tensor, guess: torch.Tensor | None, s256: int, salt: int, num: int):
    """split_reference; on CUDA one Triton launch (host_share_kernel.py)."""
    if ids.is_cuda:
        from .host_share_kernel import split_triton

        return split_triton(ids, guess, s256, salt, num)
    return split_reference(ids, guess, s256, salt, num)


class HostShare:
    """`share` (0-1) of the pool's chosen experts of each of the stage's MoE layers, computed on the
    device from the host store (read in place over PCIe on CUDA; on a CPU device, the same tensors)."""

    def __init__(self, host: HostExperts, share: float):
        if not 0 < share <= 1:
            raise ValueError(f"a host share of {share} is not in (0, 1]")
        self.host, self.share, self.s256 = host, share, round(share * 256)
        self.blocks = {layer: host.mapped_blocks(layer) for layer in host.layers}

    def split(self, layer: int, ids: torch.Tensor, guess: torch.Tensor | None):
        """(the device's choices, the pool's), as split_reference."""
        return split(ids, guess, self.s256, layer, self.host.shape(layer).num)

    def products(self, layer: int, x: torch.Tensor, mine: torch.Tensor, weights: torch.Tensor, act: str) -> torch.Tensor:
        """float32 [M, hidden]: the weighted sum of x's choices `mine` (split's first), enqueued now."""
        out = None
        for t, lookup in self.blocks[layer]:
            part = moe_pairs(x, lookup, mine, weights, t, self.host.fmt, act)
            out = part if out is None else out + part
        return out
