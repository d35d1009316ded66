"""Prefill strategies: where a stage's routed experts come from while the whole prompt runs on the
device (docs/strategies.md describes each; the names are the reference system's).

Every strategy is called by the stage as `begin()` at the start of a prefill step, and per MoE layer
in order `layer_begin(layer, ids)` with every chunk's choices, `run(layer, x, ids, weights)` per
chunk (returning x's dtype [T, H]) and `layer_end(layer)` (moe_gpu.RoutedExperts). A step holds
whole prompts, so what a strategy copies for a layer crosses PCIe once per step, not once per chunk.
Each counts the router's choices for the hot-expert cache.
"""

from __future__ import annotations

import itertools

import torch

from ..shared.expert_store import ExpertFormat
from ..shared.strategy_names import parse_prefill
from .dequant import dequantized
from .dma import Block, CopyEngine, ExpertSlots, GroupStager, HostExperts
from .hcs import Counts, HotSet
from .moe_gpu import RoutedExperts, moe_blocks

class PrefillStrategy(RoutedExperts):
    """`whole_layers`: each of a layer's blocks holds that layer's experts and nothing else, so a step
    of several chunks can dequantize them once, for all its chunks, instead of once per chunk and
    projection; `dequant_once` (set from the VRAM plan, which must hold both projections at once
    for it) says whether it does."""

    name = ""
    whole_layers = False
    dequant_once = False

    def __init__(self, host: HostExperts, engine: CopyEngine, act: str, counts: Counts):
        self.host, self.engine, self.act, self.counts = host, engine, act, counts

    def layer_begin(self, layer: int, ids: list[torch.Tensor]) -> None:
        self._layer_blocks, self._layer_fmt = self.blocks(layer, ids), self.host.fmt
        self._dequantize_once = (self.whole_layers and self.dequant_once and len(ids) > 1
                                 and self.host.fmt.kind != "dense")

    def layer_end(self, layer: int) -> None:
        self._layer_blocks = None  # a layer's dequantized experts live until its last chunk

    def run(self, layer: int, x, ids, weights):
        self.counts.add(layer, ids)
        if self._dequantize_once:
            self._layer_blocks = [(dequantized(self.host.fmt, t, x.dtype), lookup) for t, lookup in self._layer_blocks]
            self._layer_fmt = ExpertFormat("dense", x.dtype)
            self._dequantize_once = False
        return moe_blocks(x, ids, weights, self._layer_blocks, self._layer_fmt, self.act).to(x.dtype)

    def blocks(self, layer: int, ids: list[torch.Tensor]) -> list[Block]:
        """The layer's experts for a step whose chunks chose `ids`."""
        raise NotImplementedError

    def nbytes(self) -> int:
        """Device bytes this strategy holds for experts."""
        return 0

    def streamed_bytes(self) -> int | None:
        """Expert bytes a prefill step copies to the device (None: it depends on the routing)."""
        return None

    def resident_layers(self) -> int:
        """MoE layers whose experts stay in device memory for every step."""
        return len(self.resident_blocks())

    def resident_blocks(self) -> dict[int, list[Block]]:
        """Those layers' blocks (decode runs them there too: decode_strategies.DecodeStrategy)."""
        return {}


class Persistent(PrefillStrategy):
    """Every expert of the stage copied to the device once, at start. On a CPU device the store's
    own views are used (nothing to copy to)."""

    name = "persistent"
    whole_layers = True

    def __init__(self, *a):
        super().__init__(*a)
        if self.host.device.type == "cpu":
            self._blocks = {layer: self.host.host_blocks(layer) for layer in self.host.layers}
            self._bytes = 0
            return
        groups = [self.host.layers] if self.host.layers else []
        self._stager = GroupStager(self.host, groups, 1, self.engine) if groups else None
        self._blocks = self._stager.acquire(0) if groups else {}
        self._bytes = self._stager.nbytes() if groups else 0

    def blocks(self, layer, ids):
        return self._blocks[layer]

    def streamed_bytes(self):
        return 0

    def resident_blocks(self):
        return self._blocks

    def nbytes(self):
        return self._bytes


def spread(layers: list[int], k: int) -> list[int]:
    """k of the layers, evenly spaced (all of them when k >= len(layers))."""
    n = len(layers)
    k = min(k, n)
    return [layers[(2 * i + 1) * n // (2 * k)] for i in range(k)] if k else []


def stream_groups(layers: list[int], kept, n: int) -> list[list[int]]:
    """The groups layer_grouped_N streams: runs of the layers not `kept` (resident), cut every n (a
    group is one span of the store)."""
    runs = [list(r) for is_kept, r in itertools.groupby(layers, key=lambda layer: layer in kept) if not is_kept]
    return [r[i : i + n] for r in runs for i in range(0, len(r), n)]


class LayerGrouped(PrefillStrategy):
    """N MoE layers per DMA group, two staging slots: group g+1 is copied while group g computes.
    `chunked` is the one-slot, one-layer case: each layer's experts are copied, then used.

    `kept` whole layers (spread evenly over the stage so that the copy stream keeps streaming the
    next group while a resident layer computes; the VRAM plan says how many) are copied once, at
    start, and never streamed: a step streams only the other layers' experts."""

    whole_layers = True

    def __init__(self, host, engine, act, counts, n: int, slots: int = 2, kept: int = 0):
        super().__init__(host, engine, act, counts)
        self.name = f"layer_grouped_{n}" if slots == 2 else "chunked"
        L = self.host.layers
        resident = spread(L, kept)
        self._resident = GroupStager(self.host, [[layer] for layer in resident], len(resident), self.engine) if resident else None
        self.kept = {layer: b for g in range(len(resident)) for layer, b in self._resident.acquire(g).items()}
        self.groups = stream_groups(L, self.kept, n)
        self.group_of = {layer: g for g, grp in enumerate(self.groups) for layer in grp}
        self.stager = GroupStager(self.host, self.groups, slots, self.engine) if self.groups else None
        self.slots = slots
        self._cur: tuple[int, dict] | None = None
        self._plan(None)

    def _plan(self, parts: dict[int, int] | None) -> list[int]:
        """The groups a step streams, in order (each remembers the one after it)."""
        self._parts = parts
        order = [g for g in range(len(self.groups)) if self._count(g)]
        self._after = dict(zip(order, order[1:]))
        return order

    def begin(self, parts: dict[int, int] | None = None):
        """`parts`: group -> how many of its first layers this step streams (a decode step split
        with the CPU pool, decode_split.py, which runs the others there); None: every layer."""
        order = self._plan(parts)
        if order and self.slots > 1:
            self.stager.fetch(order[0], self._count(order[0]))  # overlaps the first layers' attention

    def _count(self, g: int) -> int:
        return len(self.groups[g]) if self._parts is None else self._parts.get(g, 0)

    def streams(self, layer: int) -> bool:
        """Whether this step takes the layer's experts from this strategy (kept, or streamed)."""
        if layer in self.kept:
            return True
        g = self.group_of[layer]
        return self.groups[g].index(layer) < self._count(g)

    def blocks(self, layer, ids):
        if layer in self.kept:
            return self.kept[layer]
        g = self.group_of[layer]
        if self._cur is None or self._cur[0] != g:
            self._cur = (g, self.stager.acquire(g, self._count(g)))
            after = self._after.get(g)
            if self.slots > 1 and after is not None:
                self.stager.fetch(after, self._count(after))
        return self._cur[1][layer]

    def layer_end(self, layer):
        super().layer_end(layer)
        g = self.group_of.get(layer)
        if self._cur is not None and self._cur[0] == g and layer == self.groups[g][-1]:
            self.stager.release(g)
            self._cur = None

    def streamed_bytes(self) -> int:
        return sum(self.host.layer_bytes(layer) for grp in self.groups for layer in grp)

    def resident_blocks(self):
        return self.kept

    def nbytes(self):
        return sum(s.nbytes() for s in (self.stager, self._resident) if s is not None)


class ActiveOnly(PrefillStrategy):
    """Per layer, only the experts the step's tokens chose are copied (one copy per expert and
    tensor), into slots sized for a whole layer."""

    name = "active_only"

    def __init__(self, *a, hot: HotSet | None = None):
        super().__init__(*a)
        self.hot = hot
        num = max((self.host.shape(layer).num for layer in self.host.layers), default=0)
        self.scratch = ExpertSlots(self.host, num, self.engine) if num else None
        self._lookup = {layer: torch.full((self.host.shape(layer).num,), -1, dtype=torch.long, device=self.host.device)
                        for layer in self.host.layers}
        self._released = None

    def blocks(self, layer, ids):
        out = self.hot.blocks(layer) if self.hot is not None else []
        chosen = torch.unique(torch.cat([i.reshape(-1) for i in ids]).to(self.host.device))
        if self.hot is not None:
            chosen = chosen[self.hot.lookup[layer][chosen] < 0]
        if chosen.numel() == 0:
            return out
        lk = self._lookup[layer]
        lk.fill_(-1)
        lk[chosen] = torch.arange(chosen.numel(), device=lk.device)
        for slot, e in enumerate(chosen.tolist()):
            self.scratch.load(slot, layer, e)
        # the scratch is reused per layer: the copy waits for the previous layer's compute
        self.scratch.flush(after=self._released)
        return out + [(self.scratch.t, lk)]

    def layer_end(self, layer):
        super().layer_end(layer)
        self._released = self.engine.event_after_compute()

    def nbytes(self):
        return self.scratch.nbytes() if self.scratch is not None else 0


class HcsPrefill(ActiveOnly):
    """The hot experts stay in device memory (the HCS set, shared with hcs_hybrid decode); only the
    cold experts a chunk chooses are copied."""

    name = "hcs_prefill"

    def begin(self):
        self.hot.ensure()


def make_prefill(name: str, host: HostExperts, engine: CopyEngine, act: str, counts: Counts, hot: HotSet | None,
                 kept: int = 0) -> PrefillStrategy:
    """`kept`: how many layers layer_grouped keeps on the device (the VRAM plan's)."""
    kind, n = parse_prefill(name)
    if kind == "persistent":
        return Persistent(host, engine, act, counts)
    if kind == "layer_grouped":
        return LayerGrouped(host, engine, act, counts, n, kept=kept)
    if kind == "chunked":
        return LayerGrouped(host, engine, act, counts, 1, slots=1)
    if kind == "active_only":
        return ActiveOnly(host, engine, act, counts)
    return HcsPrefill(host, engine, act, counts, hot=hot)
