"""The device's share of the CPU pool's decode work: some of a layer's chosen experts read by the
device itself from the host store over PCIe, while the pool computes the rest.

Why: a decode layer through the pool reads its chosen experts from DRAM with the pool's threads. On
the lent H100 hosts those 14 threads read 106-113 GB/s where the DRAM gave a sum over every core up to
141 (BENCHMARKS.md, session 35): a core keeps only so many reads in flight, so the pool alone leaves
DRAM bandwidth unused. The store is page-locked and mapped into the device's address space
(dma.HostExperts), so the device can read its share of a layer's experts itself, over PCIe, with
nothing on the host's path: launches in the decode graph like the hot share's. Splitting a layer's
choices between the two readers, the layer costs about the longer of the two shares instead of the
pool's whole; what that buys depends on how the DRAM serves both at once
(benchmarks/dram_share.py measures it).

How the device reads them: a copy kernel gathers its experts from the store into staging slots in
device memory, contiguous reads as a plain sum's (host_share_kernel.py), and the decode GEMV
(moe_pairs) runs on the slots as on a resident layer. The GEMV reading the store in place read it
at ~22 GB/s, where a sum's loads read 49 (its tiles keep too few reads in flight for PCIe's
latency; session 36), and it read an expert once per token that chose it.

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
from typing import NamedTuple

import torch

from ..shared.expert_store import Entry, ExpertFormat
from ..shared.models.family import ExpertShape
from .decode_route import REVISIT, StepTimes, bucket
from .dma import HostExperts

log = logging.getLogger("krasis.gpu_worker")

# The most bytes of experts the staging holds (one layer's share at a time): auto's highest level, a
# half, of a step choosing every expert is 64 of Qwen3-30B-A3B's 128 experts (170 MiB), and 25 slots
# of a 10 MB expert's.
STAGING_BYTES = 256 * 2**20


class Split(NamedTuple):
    """A layer's choices split between the device and the pool: `mine` and `pool` like ids [M, k]
    (the choices of the device's experts, and the rest; -1 elsewhere, and ids of -1, choices that
    are no one's here, stay -1 in both); `slots` [cap]: the device's experts in staging order (-1
    past `count`); `lookup` [num]: each expert's slot (-1: not the device's); `count` int32 [1]."""

    mine: torch.Tensor
    pool: torch.Tensor
    slots: torch.Tensor
    lookup: torch.Tensor
    count: torch.Tensor


def split_reference(ids: torch.Tensor, guess: torch.Tensor | None, s256: int, salt: int, num: int,
                    cap: int | None = None) -> Split:
    """The device takes min((n * s256 + 128) // 256, cap) of the n distinct experts chosen: those the
    guess did not name first, then by (e + salt) % num; its slots in that order."""
    cap = num if cap is None else cap
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
    take = min((len(candidates) * s256 + 128) // 256, cap)
    order = candidates[key[chosen].argsort()][:take]
    slots = torch.full((cap,), -1, dtype=torch.long)
    slots[:take] = order
    lookup = torch.full((num,), -1, dtype=torch.long)
    lookup[order] = torch.arange(take)
    lookup = lookup.to(ids.device)
    is_mine = (ids >= 0) & (lookup[ids.clamp(min=0)] >= 0)
    return Split(torch.where(is_mine, ids, -1), torch.where(is_mine, -1, ids), slots.to(ids.device), lookup,
                 torch.tensor([take], dtype=torch.int32, device=ids.device))


def split(ids: torch.Tensor, guess: torch.Tensor | None, s256: torch.Tensor, salt: int, num: int, cap: int) -> Split:
    """split_reference with the level in an int32 [1] tensor; on CUDA one Triton launch
    (host_share_kernel.py), which reads it on the device."""
    if ids.is_cuda:
        from .host_share_kernel import split_triton

        return Split(*split_triton(ids, guess, s256, salt, num, cap))
    return split_reference(ids, guess, int(s256), salt, num, cap)


def gather_reference(src: torch.Tensor, dst: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor,
                     count: torch.Tensor) -> None:
    """dst[s] = src[rows[slots[s]]] for the slots s < count whose row is >= 0 (rows: a block's
    lookup; -1 for an expert another block holds)."""
    s = torch.arange(int(count))
    r = rows[slots[s]]
    held = r >= 0
    dst[s[held]] = src[r[held]]


def gather(src: torch.Tensor, dst: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor, count: torch.Tensor) -> None:
    """gather_reference; on CUDA one Triton launch, which reads the count on the device."""
    if dst.is_cuda:
        from .host_share_kernel import gather_triton

        return gather_triton(src, dst, slots, rows, count)
    gather_reference(src, dst, slots, rows, count)


def staging_slots(fmt: ExpertFormat, es: ExpertShape, s256: int) -> int:
    """The experts a layer's staging holds at share s256: the most the share takes of a step choosing
    every expert, within STAGING_BYTES."""
    return min(-(-es.num * s256 // 256), max(1, STAGING_BYTES // _aligned(fmt.tensors(es, 1))))


def staging_bytes(fmt: ExpertFormat, es: ExpertShape, s256: int) -> int:
    """The bytes of those slots (each tensor 16-byte aligned, as _views lays them out)."""
    return _aligned(fmt.tensors(es, staging_slots(fmt, es, s256)))


def share_most(share: float | None, pooled: bool, cuda: bool) -> int:
    """The highest level (256ths) of the host share a stage runs at, 0 for none: --pcie-share F's;
    auto's (ShareTuner.LEVELS' last) on a GPU, none on a CPU device (the pool is the thing tested
    there); none where the decode strategy sends the pool nothing (`pooled` false)."""
    if not pooled:
        return 0
    if share is None:
        return ShareTuner.LEVELS[-1] if cuda else 0
    return round(256 * share)


class HostShare:
    """A share of the pool's chosen experts of each of the stage's MoE layers, computed on the
    device from the host store: the split (which experts), their copy from the store's blocks
    (read in place over PCIe on CUDA: dma.HostExperts.mapped_blocks) into staging slots in device
    memory, and the staged block the decode strategy runs as a resident layer's
    (decode_strategies.OnDevice). The staging holds `most` (256ths) of a layer's experts, within
    STAGING_BYTES (staging_slots); every layer uses it in turn (stream order).
    The share is a level in 256ths (`use`), held in device memory: a step's graph reads it when it
    replays, so the tuner changes it between steps without capturing again."""

    def __init__(self, host: HostExperts, most: int = 256):
        self.host = host
        self.level, self._level = torch.zeros(1, dtype=torch.int32, device=host.device), 0
        self.blocks = {layer: host.mapped_blocks(layer) for layer in host.layers}
        fmt = host.fmt
        self.caps = {i: staging_slots(fmt, host.shape(i), most) for i in host.layers}
        self.nbytes = max(staging_bytes(fmt, host.shape(i), most) for i in host.layers)
        # zeros, not empty: the CPU's products (moe_gpu._block) read a block's every row, weighting
        # those of no pair by 0, and uninitialised bytes may be NaNs; later a slot holds some expert
        buffer = torch.zeros(self.nbytes, dtype=torch.uint8, device=host.device)
        self.staged = {i: _views(buffer, fmt.tensors(host.shape(i), self.caps[i])) for i in host.layers}

    def use(self, s256: int) -> None:
        """The share of the steps enqueued from now on (stream order on a GPU)."""
        if s256 != self._level:
            self.level.fill_(s256)
            self._level = s256

    def split(self, layer: int, ids: torch.Tensor, guess: torch.Tensor | None) -> Split:
        return split(ids, guess, self.level, layer, self.host.shape(layer).num, self.caps[layer])

    def staged_block(self, layer: int, s: Split):
        """The device's experts of split `s` copied from the host store into the staging: the block
        (tensors, lookup) that holds them."""
        for t, rows in self.blocks[layer]:
            for name, v in t.items():
                gather(v, self.staged[layer][name], s.slots, rows, s.count)
        return self.staged[layer], s.lookup


def _nbytes(dtype, shape) -> int:
    return -(-Entry(0, dtype, shape).nbytes // 16) * 16


def _aligned(tensors: dict) -> int:
    """The bytes of tensors of the given (dtype, shape) one after another, each 16-byte aligned."""
    return sum(_nbytes(*v) for v in tensors.values())


def _views(buffer: torch.Tensor, tensors: dict) -> dict[str, torch.Tensor]:
    """Those tensors, laid out so in a byte buffer."""
    out, at = {}, 0
    for name, (dtype, shape) in tensors.items():
        out[name] = buffer[at:].view(dtype)[: torch.Size(shape).numel()].view(shape)
        at += _nbytes(dtype, shape)
    return out


class ShareTuner:
    """--pcie-share auto: per batch-size bucket (decode_route.bucket), the level whose decode steps
    ran fastest. How much the device should take depends on how fast it reads host memory over PCIe
    against the pool's DRAM rate, on what the DRAM gives both at once, and on the batch (the pool's
    arithmetic grows with its tokens, the device's reads do not), all of which differ between hosts:
    so it is measured, as the decode route measures its runners.

    From none, a bucket climbs LEVELS (each level's median step of SAMPLES, the first at a level not
    kept) until two levels in a row are no faster than the best below them by MARGIN (one-token
    steps are noisy: on a lent H100 host an eighth measured slower than none where a quarter was
    8-15% faster, session 37). Then it measures none and the climb's best again, in turn, step by
    step, and keeps the share where it is faster by MARGIN; every REVISIT steps it so compares the
    choice with a neighbour, as the load and the hot set change. In turn, because a lent host's speed
    drifts while it is measured: a batch's first steps ran 9.1 ms a token where the steady state ran
    6.6, and 120 ms a 32-token step against 67 (session 36), and the DRAM read moved 76-122 GB/s
    within one bench process, where auto once kept 3/8 at one token from medians within that noise,
    4% slower than none (session 37). `fixed`: that level always (--pcie-share F).

    LEVELS end at a half: at 16 and 32 tokens 3/8 was fastest and a half slower (a 32-token step 68.8
    ms at 3/8, 80.8 at a half, 96.5 with none), at one token a quarter (session 37); the staging
    holds the highest level's experts."""

    LEVELS = (0, 32, 64, 96, 128)  # eighths, none to a half
    MARGIN = 0.02

    def __init__(self, fixed: int | None = None):
        self.fixed = fixed
        self.times = StepTimes()  # (bucket, level index) -> recent step seconds
        self.climb: dict[int, int] = {}  # bucket -> the level index its climb measures
        self.pair: dict[int, tuple[int, int]] = {}  # bucket -> two level indices measured in turn
        self.choice: dict[int, int] = {}  # bucket -> the level index chosen
        self.steps: dict[int, int] = defaultdict(int)

    def _measured(self, b: int, i: int) -> bool:
        return self.times.measured((b, i))

    def _median(self, b: int, i: int) -> float:
        return self.times.median((b, i))

    def pick(self, tokens: int) -> int:
        """The level of a step of `tokens` tokens."""
        if self.fixed is not None:
            return self.fixed
        levels = self.LEVELS
        b = bucket(tokens)
        self.steps[b] += 1
        if b in self.pair:
            pair = self.pair[b]
            if not all(self._measured(b, i) for i in pair):
                return levels[pair[self.steps[b] % 2]]
            self._decide(b, pair)
        elif b not in self.choice:  # climbing
            i = self.climb.setdefault(b, 0)
            if not self._measured(b, i):
                return levels[i]
            if i + 1 < len(levels) and (self._gained(b, i) or self._gained(b, i - 1)):
                self.climb[b] = i + 1
                return levels[i + 1]
            best = min(range(1, i + 1), key=lambda j: self._median(b, j))  # i >= 1: none always climbs
            log.info("decode steps of up to %d tokens: the host share's climb %s; none and %.0f%% again, in turn", b,
                     ", ".join(f"{100 * levels[j] / 256:.0f}% {1e3 * self._median(b, j):.2f} ms" for j in range(i + 1)),
                     100 * levels[best] / 256)
            self._compare(b, (0, best))
            return levels[0]
        elif self.steps[b] % REVISIT == 0:  # alternately the level above the choice and below it
            near = self.choice[b] + (1 if (self.steps[b] // REVISIT) % 2 else -1)
            if 0 <= near < len(levels):
                self._compare(b, (self.choice[b], near))
        return levels[self.choice[b]]

    def _gained(self, b: int, i: int) -> bool:
        """Whether level i ran faster than every level below it by MARGIN (none, and a level before
        it, count as gains: the climb starts)."""
        if i <= 0:
            return True
        return self._median(b, i) < min(self._median(b, j) for j in range(i)) * (1 - self.MARGIN)

    def _compare(self, b: int, pair: tuple[int, int]) -> None:
        """Measure the two levels again, in turn."""
        for i in pair:
            self.times.forget((b, i))
        self.pair[b] = pair

    def _decide(self, b: int, pair: tuple[int, int]) -> None:
        """The pair's second level where it ran faster than the first (none, or the choice) by MARGIN."""
        del self.pair[b]
        best = pair[1] if self._median(b, pair[1]) < self._median(b, pair[0]) * (1 - self.MARGIN) else pair[0]
        if self.choice.get(b) != best:
            log.info("decode steps of up to %d tokens: the device takes %.0f%% of the pool's experts (%s)", b,
                     100 * self.LEVELS[best] / 256,
                     ", ".join(f"{100 * self.LEVELS[i] / 256:.0f}% {1e3 * self._median(b, i):.2f} ms" for i in pair))
        self.choice[b] = best

    def record(self, tokens: int, s256: int, seconds: float) -> None:
        """A decode step of `tokens` tokens that ran at level s256 took `seconds` on the device; a
        level's first step in a bucket is not kept (its first replay, or the graph's capture)."""
        if self.fixed is not None or s256 not in self.LEVELS:
            return
        self.times.add((bucket(tokens), self.LEVELS.index(s256)), seconds)

    def describe(self) -> dict[str, float]:
        """bucket -> the share chosen for it."""
        if self.fixed is not None:
            return {"all": self.fixed / 256}
        return {str(b): self.LEVELS[i] / 256 for b, i in sorted(self.choice.items())}
