"""The hot-expert cache (HCS): how often each routed expert is chosen, and the hottest ones kept in
device memory.

Counts are gathered from the router's choices in every prefill step (and by `--calibrate`, which
is a prefill). They are remembered per model in a small JSON (`hcs_counts.json` in the model's
state folder, coordinator/state.py) that every worker of the model merges its layers into, so a
restart starts with the hot set of the last run. Beside each layer's counts the file keeps the
choices consecutive tokens shared and the count of such pairs (shared/routing_stats.py), from which
`calibrate` reports how the routing repeats between nearby tokens. The hot set is the most-chosen (layer, expert)
pairs of this stage that fit in the bytes the VRAM plan leaves for it; each layer gets a lookup
from expert id to its slot, -1 for the cold ones.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections import Counter
from pathlib import Path

import torch

from ..shared.routing_stats import consecutive_overlap, count_choices
from .dma import Block, CopyEngine, ExpertSlots, HostExperts


class Counts:
    def __init__(self, layers: dict[int, int], path: str | None, device: torch.device | str = "cpu"):
        """layers: layer -> number of experts. The counts live on `device`, where the router's
        choices are: counting then costs no host synchronisation in the prefill loop."""
        self.path = Path(path) if path else None
        self.c = {layer: torch.zeros(n, dtype=torch.int64, device=device) for layer, n in layers.items()}
        # per layer: [choices shared by consecutive tokens, consecutive pairs]
        self.pairs = {layer: torch.zeros(2, dtype=torch.int64, device=device) for layer in layers}
        if self.path and self.path.exists():
            try:
                saved = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError):
                saved = {}
            for layer, counts in saved.get("layers", {}).items():
                if int(layer) in self.c and len(counts) == len(self.c[int(layer)]):
                    self.c[int(layer)] += torch.tensor(counts, dtype=torch.int64, device=device)
                    self.pairs[int(layer)] += torch.tensor(saved.get("pairs", {}).get(layer, [0, 0]), device=device)

    def add(self, layer: int, ids: torch.Tensor) -> None:
        """The choices ids [T, k] of a prefill chunk's tokens, in order. Pairs are counted within the
        chunk: a prompt split over chunks loses one pair per split, and prompts sharing a chunk add one
        pair of unrelated tokens per boundary, both negligible against a chunk's thousands of tokens."""
        c = self.c[layer]
        ids = ids.to(c.device)
        c += count_choices(ids, len(c))
        if ids.shape[0] > 1:
            self.pairs[layer][0] += consecutive_overlap(ids)
            self.pairs[layer][1] += ids.shape[0] - 1

    def total(self) -> int:
        return int(sum(int(v.sum()) for v in self.c.values()))

    def save(self) -> None:
        """Merge this stage's layers into the model's file (other stages own the other layers)."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = {"layers": {}}
            if self.path.exists():
                try:
                    data = json.loads(self.path.read_text())
                except (OSError, json.JSONDecodeError):
                    pass
            data.setdefault("layers", {}).update({str(k): v.tolist() for k, v in self.c.items()})
            data.setdefault("pairs", {}).update({str(k): v.tolist() for k, v in self.pairs.items()})
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, self.path)


# A layer the CPU pool serves costs a decode step its hop (the GPU's turn and both crossings) plus
# the pool's kernel in proportion to the share of the layer's choices it runs. The hop in units of
# a whole layer's kernel: 120-165 us against 300-360 on the H200 host C, 120-170 against 113-150 on
# the H100 host B (BENCHMARKS.md, session 20).
HOP_SHARE = 0.5


def hottest(counts: Counts, capacity: int, hop: float = HOP_SHARE) -> list[tuple[int, int]]:
    """At most `capacity` (layer, expert) pairs to keep on the device, chosen for the pool time they
    save: an expert saves its share of its layer's choices (in units of a layer's kernel), and
    making every expert of a layer hot also saves that layer's hop (`hop` of a kernel), as the pool
    is then never asked for it. Greedy by saving per slot: under balanced routing a whole layer
    (1 + hop over its E slots) beats scattered experts (about 1/E each) and the hot set becomes
    resident layers; under skewed routing the most-chosen experts come first. Each layer's hot
    experts are its most chosen (ties by expert id); never-chosen experts are taken only to
    complete a layer."""
    ranked, share, rest = {}, {}, {}
    for layer, c in counts.c.items():
        n = c.tolist()
        total = sum(n)
        if total:
            ranked[layer] = order = sorted(range(len(n)), key=lambda e: (-n[e], e))
            share[layer] = [n[e] / total for e in order]
            rest[layer] = [0.0] * (len(n) + 1)  # rest[k]: the share of the experts after the first k
            for k in range(len(n) - 1, -1, -1):
                rest[layer][k] = rest[layer][k + 1] + share[layer][k]
    taken = {layer: 0 for layer in ranked}  # a layer's hot experts are the first `taken` of its ranking
    left = capacity
    while left > 0:
        best, pick = 0.0, None
        for layer, order in ranked.items():
            k, num = taken[layer], len(order)
            if k == num:
                continue
            if share[layer][k] > best:
                best, pick = share[layer][k], (layer, k + 1)
            if num - k <= left and (rest[layer][k] + hop) / (num - k) > best:
                best, pick = (rest[layer][k] + hop) / (num - k), (layer, num)
        if pick is None:
            break
        layer, k = pick
        left -= k - taken[layer]
        taken[layer] = k
    return [(layer, e) for layer, order in ranked.items() for e in order[: taken[layer]]]


class HotSet:
    """The hot experts of this stage in device memory, built once counts exist."""

    def __init__(self, host: HostExperts, counts: Counts, capacity: int, engine: CopyEngine):
        self.host, self.counts, self.capacity, self.engine = host, counts, capacity, engine
        self.slots = ExpertSlots(host, capacity, engine) if capacity > 0 else None
        self.lookup = {layer: torch.full((host.shape(layer).num,), -1, dtype=torch.long, device=host.device) for layer in host.layers}
        self.built = False
        self.members: list[tuple[int, int]] = []

    def ensure(self) -> None:
        if self.built or self.slots is None or self.counts.total() == 0:
            return
        self.members = hottest(self.counts, self.capacity)
        for slot, (layer, e) in enumerate(self.members):
            self.slots.load(slot, layer, e)
            self.lookup[layer][e] = slot
        self.slots.flush()
        self.built = True

    def blocks(self, layer: int) -> list[Block]:
        return [(self.slots.t, self.lookup[layer])] if self.members else []

    def full_layers(self) -> list[int]:
        """The layers all of whose experts are hot: hcs_hybrid runs them as resident, never asking
        the pool."""
        per = Counter(layer for layer, _ in self.members)
        return [layer for layer, n in per.items() if n == self.host.shape(layer).num]

    def local(self, layer: int, ids: torch.Tensor) -> torch.Tensor:
        """Each chosen expert's slot, -1 for a cold one (on the device: no host synchronisation)."""
        return self.lookup[layer][ids.to(self.host.device).long()]

    def nbytes(self) -> int:
        return self.slots.nbytes() if self.slots is not None else 0
