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

import logging
from collections import defaultdict

import torch

from .decode_route import REVISIT, StepTimes, bucket
from .dma import HostExperts

log = logging.getLogger("krasis.gpu_worker")


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


def split(ids: torch.Tensor, guess: torch.Tensor | None, s256: torch.Tensor, salt: int, num: int):
    """split_reference with the level in an int32 [1] tensor; on CUDA one Triton launch
    (host_share_kernel.py), which reads it on the device."""
    if ids.is_cuda:
        from .host_share_kernel import split_triton

        return split_triton(ids, guess, s256, salt, num)
    return split_reference(ids, guess, int(s256), salt, num)


class HostShare:
    """A share of the pool's chosen experts of each of the stage's MoE layers, computed on the
    device from the host store: `blocks`, layer -> the store's blocks as the device reads them (in
    place over PCIe on CUDA; on a CPU device, the same tensors), whose products the decode strategy
    runs as a resident layer's (decode_strategies.OnDevice).
    The share is a level in 256ths (`use`), held in device memory: a step's graph reads it when it
    replays, so the tuner changes it between steps without capturing again. Steps of fewer than
    `min_tokens` tokens take no share (decode_strategies leaves it out of their graphs)."""

    def __init__(self, host: HostExperts, min_tokens: int = 1):
        self.host, self.min_tokens = host, min_tokens
        self.level, self._level = torch.zeros(1, dtype=torch.int32, device=host.device), 0
        self.blocks = {layer: host.mapped_blocks(layer) for layer in host.layers}

    def use(self, s256: int) -> None:
        """The share of the steps enqueued from now on (stream order on a GPU)."""
        if s256 != self._level:
            self.level.fill_(s256)
            self._level = s256

    def split(self, layer: int, ids: torch.Tensor, guess: torch.Tensor | None):
        """(the device's choices, the pool's), as split_reference."""
        return split(ids, guess, self.level, layer, self.host.shape(layer).num)



# --pcie-share auto takes no share of steps below this many tokens: at one token the device's decode GEMV
# read an expert from host memory at ~22 GB/s (its [32 rows, 128 bytes] tiles keep too few reads in
# flight over PCIe, where a plain sum read 49 GB/s), ~150 us an expert, and no share made a token
# faster on the lent H100 host; at 32 tokens 25% made a step 7% faster (BENCHMARKS.md, session 36).
MIN_TOKENS = 8


class ShareTuner:
    """--pcie-share auto: per batch-size bucket (decode_route.bucket), the level whose decode steps
    ran fastest. How much the device should take depends on how fast it reads host memory over PCIe
    against the pool's DRAM rate, on what the DRAM gives both at once, and on the batch (the pool's
    arithmetic grows with its tokens, the device's reads do not), all of which differ between hosts:
    so it is measured, as the decode route measures its runners. From none, a bucket climbs LEVELS
    while each level's median step (SAMPLES of them, the first at a level not kept) is faster than the
    last by more than MARGIN, then measures none again (its first samples come from the steps right
    after the batch formed: on a lent H100 host they ran 9.1 ms a token where the steady state ran
    6.6, and 120 ms a 32-token step against 67, which made any share look faster; session 36), keeps
    the best, and every REVISIT steps tries a neighbour of it again, as the load and the hot set
    change. Steps of fewer than `min_tokens` tokens take no share. `fixed`: that level always
    (--pcie-share F)."""

    LEVELS = (0, 32, 64, 96, 128, 160, 192)  # eighths, none to three quarters
    MARGIN = 0.02

    def __init__(self, fixed: int | None = None, min_tokens: int = 1):
        self.fixed, self.min_tokens = fixed, min_tokens
        self.confirmed: set[int] = set()  # buckets whose level 0 was measured again after the climb
        self.times = StepTimes()  # (bucket, level index) -> recent step seconds
        self.trial: dict[int, int] = {}  # bucket -> the level index it measures now (climbing, or a revisit)
        self.choice: dict[int, int] = {}  # bucket -> the level index chosen
        self.steps: dict[int, int] = defaultdict(int)

    def _measured(self, b: int, i: int) -> bool:
        return self.times.measured((b, i))

    def _median(self, b: int, i: int) -> float:
        return self.times.median((b, i))

    def pick(self, tokens: int) -> int:
        """The level of a step of `tokens` tokens."""
        if tokens < self.min_tokens:
            return 0
        if self.fixed is not None:
            return self.fixed
        levels = self.LEVELS
        b = bucket(tokens)
        self.steps[b] += 1
        if b not in self.choice:  # climbing
            i = self.trial.setdefault(b, 0)
            if not self._measured(b, i):
                return levels[i]
            if b in self.confirmed:  # none, measured again
                self._decide(b)
                return levels[self.choice[b]]
            if i + 1 < len(levels) and (i == 0 or self._median(b, i) < self._median(b, i - 1) * (1 - self.MARGIN)):
                self.trial[b] = i + 1
                return levels[i + 1]
            self.confirmed.add(b)
            self.times.forget((b, 0))
            self.trial[b] = 0
            return levels[0]
        elif b in self.trial:  # a neighbour measured again
            if not self._measured(b, self.trial[b]):
                return levels[self.trial[b]]
            self._decide(b)
        elif self.steps[b] % REVISIT == 0:  # alternately the level above the choice and below it
            near = self.choice[b] + (1 if (self.steps[b] // REVISIT) % 2 else -1)
            if 0 <= near < len(levels):
                self.times.forget((b, near), first_too=True)
                self.trial[b] = near
                return levels[near]
        return levels[self.choice[b]]

    def _decide(self, b: int) -> None:
        self.trial.pop(b, None)
        measured = [i for i in range(len(self.LEVELS)) if self._measured(b, i)]
        best = min(measured, key=lambda i: self._median(b, i))
        if self.choice.get(b) != best:
            log.info("decode steps of up to %d tokens: the device takes %.0f%% of the pool's experts (%s)", b,
                     100 * self.LEVELS[best] / 256,
                     ", ".join(f"{100 * self.LEVELS[i] / 256:.0f}% {1e3 * self._median(b, i):.2f} ms" for i in measured))
        self.choice[b] = best

    def record(self, tokens: int, s256: int, seconds: float) -> None:
        """A decode step of `tokens` tokens that ran at level s256 took `seconds` on the device; a
        level's first step in a bucket is not kept (its first replay, or the graph's capture)."""
        if self.fixed is not None or tokens < self.min_tokens or s256 not in self.LEVELS:
            return
        self.times.add((bucket(tokens), self.LEVELS.index(s256)), seconds)

    def describe(self) -> dict[str, float]:
        """bucket -> the share chosen for it."""
        if self.fixed is not None:
            return {"all": self.fixed / 256}
        return {str(b): self.LEVELS[i] / 256 for b, i in sorted(self.choice.items())}
