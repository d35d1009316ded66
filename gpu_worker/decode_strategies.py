"""Decode strategies: who runs a decode step's routed experts (docs/strategies.md).

Same interface as the prefill strategies (moe_gpu.RoutedExperts), plus `close()`.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from functools import partial
from typing import Callable

import torch

from ..shared.strategy_names import POOL_DECODE, check_decode
from .dma import Block, CopyEngine, ExpertSlots, HostExperts
from .hcs import HotSet
from .host_share import HostShare
from .moe_gpu import RoutedExperts, moe_blocks, moe_pairs
from .pool_client import PoolClient

# Whether the device guesses the pool's next layer's experts (DecodeStrategy.guess); with
# KRASIS_POOL_GUESS=0 the pool guesses them itself after answering (an A/B, and a way out).
POOL_GUESS = os.environ.get("KRASIS_POOL_GUESS", "1") != "0"
# Whether the device reads the next layer's weights into its L2 while the pool runs a layer
# (DecodeStrategy.warm); KRASIS_L2_WARM=0 for an A/B.
L2_WARM = os.environ.get("KRASIS_L2_WARM", "1") != "0"


class DecodeStrategy(RoutedExperts):
    """`resident`: layer -> the blocks the prefill strategy keeps in device memory for every step
    (experts.py sets it, and `resident_on`, where resident decode is on; hcs_hybrid adds the layers
    its hot set holds whole). pure_cpu and hcs_hybrid run those layers'
    experts on the device (moe_pairs, as hcs_hybrid's hot share) and send the pool nothing for them:
    the weights are already there, and the pool's turn for such a layer (its kernel reading the
    chosen experts from DRAM, and the device waiting for it) is what a decode layer costs most.
    `takes_resident`: whether the strategy does: those that send the pool its choices (POOL_DECODE;
    compact and lru run every expert on the device).
    `routes`: MoE layer -> its router (route(x) -> ids, weights), in layer order (the stage sets it),
    for the guess. `warms`: layer -> the launch that reads the stage's next layer's weights into the
    device's L2 (the stage sets it on CUDA). `host_share`: the share of the pool's choices the device
    computes from host memory meanwhile (host_share.py), or None."""

    name = ""

    def __init__(self, pool: PoolClient | None, host: HostExperts, engine: CopyEngine, act: str):
        self.pool, self.host, self.engine, self.act = pool, host, engine, act
        self.resident: dict[int, list] = {}
        self.resident_on = False  # resident decode on (experts.py): layers on the device skip the pool
        self.routes: dict[int, Callable] = {}
        self.warms: dict[int, Callable[[], None]] = {}
        self.host_share: HostShare | None = None  # experts.py sets it (--pcie-share)
        self._guessed = None

    @property
    def takes_resident(self) -> bool:
        return self.name in POOL_DECODE

    def begin(self):
        self._guessed = None  # (layer, ids) the device last guessed within this step
        super().begin()

    def guess(self, layer: int, x: torch.Tensor) -> None:
        """After posting `layer`'s work to the pool: the experts its next layer for the pool will
        probably choose, from this layer's x through that layer's router, posted for the pool to
        read ahead once it has answered (cpu_worker/lookahead.py). The device computes the guess
        while the pool runs this layer, where the device idles anyway; the pool used to compute it
        after answering, ~14 us of the device's ~60 us turn between two layers (session 26), and
        read nothing meanwhile."""
        if not POOL_GUESS:
            return
        nxt = next((i for i in self.routes if i > layer and i not in self.resident), None)
        if nxt is not None:
            ids = self.routes[nxt](x)[0]
            self.pool.guess(nxt, ids)
            self._guessed = (nxt, ids)

    def _pool_submit(self, layer: int, x, weights, ids, device_share: Callable[[], torch.Tensor] | None):
        """Post `layer`'s choices `ids` to the pool, less those the host share takes (host_share.py),
        then, while the pool works: the guess of its next layer, the device's own shares (hot experts
        in VRAM: `device_share`; the host share's, read from host memory) and the L2 warm-up (after
        them: the next layer waits for them as it waits for the pool). Returns the device's float32
        part for the pool's wait to add, or None."""
        split = None
        if self.host_share is not None:
            guessed = self._guessed[1] if self._guessed is not None and self._guessed[0] == layer else None
            split = self.host_share.split(layer, ids, guessed)
            ids = split.pool
        self.pool.submit(layer, x, ids, weights)
        self.guess(layer, x)
        mine = device_share() if device_share is not None else None
        if split is not None:  # enqueued now, as the hot share is: the device computes it while the pool works
            block = self.host_share.staged_block(layer, split)
            part = OnDevice([block], x, split.mine, weights, self.host.fmt, self.act)()
            mine = part if mine is None else mine + part
        self.warm(layer)
        return mine

    def warm(self, layer: int) -> None:
        """After posting `layer`'s work to the pool: the next layer's weights into the device's L2
        while the device waits for the pool, so that its turn's products read them from there
        (l2_warm_kernel.py says why)."""
        if L2_WARM and layer in self.warms:
            self.warms[layer]()

    def _on_device(self, layer: int, x, ids, weights) -> OnDevice:
        """A resident layer's routed experts for x, on the device, enqueued when collected."""
        return OnDevice(self.resident[layer], x, ids, weights, self.host.fmt, self.act)

    def nbytes(self) -> int:
        return 0

    def end(self, done=None, interrupt=None) -> bool:
        if self.pool is not None:
            return self.pool.finish(done, interrupt)  # the step's requests answered, or PoolError
        return super().end(done, interrupt)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


class PureCpu(DecodeStrategy):
    """Every routed expert on the CPU pool, but those of resident layers (DecodeStrategy) and the
    host share's (host_share.py)."""

    name = "pure_cpu"
    graphable = True

    def run(self, layer, x, ids, weights):
        return self.collect(self.submit(layer, x, ids, weights))

    def submit(self, layer, x, ids, weights):
        if layer in self.resident:
            return x.dtype, self._on_device(layer, x, ids, weights), False
        return x.dtype, self._pool_submit(layer, x, weights, *self._hot(layer, x, ids, weights)), True

    def _hot(self, layer, x, ids, weights):
        """(the choices left for the pool, the device's share of the rest in VRAM or None): none here."""
        return ids, None

    def collect(self, pending):
        dtype, mine, pooled = pending
        return (self.pool.collect(extra=mine) if pooled else mine()).to(dtype)

    def collect_add(self, pending, h):
        _, mine, pooled = pending
        # the pool's own rounding (pool_client.collect): residual + the float32 sum in its dtype
        return self.pool.collect(residual=h, extra=mine) if pooled else mine(residual=h)


class HcsHybrid(PureCpu):
    """Hot experts on the device, the rest on the CPU pool, at the same time: the pool's share is
    posted first (the hot ids masked to -1, which no pool process holds), the device computes its
    share while the pool works (moe_pairs: nothing waits for the host, so the step is a CUDA graph),
    and the pool's wait adds the two in float32."""

    name = "hcs_hybrid"

    def __init__(self, pool, host, engine, act, hot: HotSet):
        super().__init__(pool, host, engine, act)
        self.hot = hot
        self._whole = False

    def begin(self):
        self.hot.ensure()
        if self.hot.built and self.resident_on and not self._whole:
            # layers whose every expert is hot (hcs.hottest completes layers where that saves more
            # than scattered experts) run as resident ones: the pool is never asked, so no hop
            self._whole = True
            for layer in self.hot.full_layers():
                self.resident.setdefault(layer, self.hot.blocks(layer))
        super().begin()

    def _hot(self, layer, x, ids, weights):
        local = self.hot.local(layer, ids)
        hot = None if self.hot.slots is None else partial(
            moe_pairs, x, self.hot.lookup[layer], ids, weights, self.hot.slots.t, self.host.fmt, self.act)
        # the hot experts in the guess are left out by the pool (lookahead.py: QUIET)
        return ids.masked_fill(local >= 0, -1), hot

    def nbytes(self):
        return self.hot.nbytes()


class SlotDecode(DecodeStrategy):
    """Routed experts on the device from single-expert slots filled over DMA on demand.
    `compact`: slots for one layer's chosen experts, refilled every layer (nothing kept).
    `lru`: a larger cache of (layer, expert) slots shared by the stage's layers; a miss evicts the
    least recently used expert that this layer does not need."""

    def __init__(self, pool, host, engine, act, capacity: int, keep: bool):
        super().__init__(pool, host, engine, act)
        self.name = "lru" if keep else "compact"
        self.keep = keep
        self.slots = ExpertSlots(host, capacity, engine)
        self.where: OrderedDict[tuple[int, int], int] = OrderedDict()
        self.free = list(range(capacity))
        self._released = None
        self.hits = self.misses = 0
        self._lk_host: dict[int, torch.Tensor] = {}

    def _place(self, layer: int, chosen: list[int]) -> torch.Tensor:
        need = set((layer, e) for e in chosen)
        if not self.keep:
            self.where.clear()
            self.free = list(range(self.slots.capacity))
        for key in need:
            if key in self.where:
                self.where.move_to_end(key)
                self.hits += 1
                continue
            self.misses += 1
            if not self.free:
                victim = next(k for k in self.where if k not in need)
                self.free.append(self.where.pop(victim))
            slot = self.free.pop()
            self.where[key] = slot
            self.slots.load(slot, *key)
        # a slot may be refilled only after the compute that last read it
        self.slots.flush(after=self._released)
        lk = self._lk_host.setdefault(layer, _host_buffer(self.host.shape(layer).num, self.host.device))
        lk.fill_(-1)
        for e in chosen:
            lk[e] = self.where[(layer, e)]
        # one pinned buffer per layer: the step that reuses it starts after this one's output was read
        return lk.to(self.host.device, non_blocking=True)

    def run(self, layer, x, ids, weights):
        chosen = torch.unique(ids.reshape(-1)).tolist()
        lk = self._place(layer, chosen)
        out = moe_blocks(x, ids, weights, [(self.slots.t, lk)], self.host.fmt, self.act).to(x.dtype)
        self._released = self.engine.event_after_compute()
        return out

    def nbytes(self):
        return self.slots.nbytes()


class OnDevice:
    """A decode step's routed experts for x from blocks in device memory, each (token, choice) pair
    its own product (moe_pairs): a few tokens' pairs read fewer bytes than dequantizing the blocks
    whole, as a prompt chunk's experts are (moe_blocks). Called when the layer collects them:
    () -> float32 [M, hidden]; (residual=h) -> h + that sum in h's dtype, which a resident layer's
    one block adds in its combine (the stream runs the layer's kernels in order, so enqueueing them
    at the collect rather than the submit delays nothing)."""

    def __init__(self, blocks: list[Block], x, ids, weights, fmt, act: str):
        self.blocks, self.x, self.ids, self.weights, self.fmt, self.act = blocks, x, ids, weights, fmt, act

    def __call__(self, residual: torch.Tensor | None = None) -> torch.Tensor:
        def part(block, residual=None):
            return moe_pairs(self.x, block[1], self.ids, self.weights, block[0], self.fmt, self.act, residual)

        if len(self.blocks) == 1:  # a resident layer: its combine adds the residual
            return part(self.blocks[0], residual)
        out = part(self.blocks[0])
        for block in self.blocks[1:]:
            out = out + part(block)
        return out if residual is None else residual + out.to(residual.dtype)


def _host_buffer(n: int, device) -> torch.Tensor:
    t = torch.empty(n, dtype=torch.long)
    return t.pin_memory() if device.type == "cuda" else t


def make_decode(name: str, pool, host: HostExperts, engine: CopyEngine, act: str, hot: HotSet | None,
                lru_capacity: int) -> DecodeStrategy:
    if check_decode(name) == "pure_cpu":
        return PureCpu(pool, host, engine, act)
    if name == "hcs_hybrid":
        return HcsHybrid(pool, host, engine, act, hot)
    num = max(host.shape(layer).num for layer in host.layers)
    if name == "compact":
        return SlotDecode(pool, host, engine, act, num, keep=False)
    return SlotDecode(pool, host, engine, act, max(num, lru_capacity), keep=True)
