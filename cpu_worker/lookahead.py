"""The pool's lookahead: while the GPU worker runs its part of the next layer, read the experts that
layer will probably choose into the pool cores' caches (expert_kernel.c: krasis_lookahead says why
and how). After answering layer L, the pool applies layer L+1's router to layer L's input, still in
the slot, and reads what its top-k names, each thread the rows the kernel will give it, until the
next request arrives. When that request is for layer L+1, its ids score the guess (`stats`).

With hcs_hybrid the GPU runs its hot experts itself and the pool is never asked for them (their ids
come masked), so reading them ahead would waste the turn: an expert a layer has not been asked for in
its last QUIET requests is left out of that layer's reads (taken as hot), until it is asked for again.

The input is read from the slot after the reply, while the GPU worker cannot yet write the next one
(it first runs attention and the router, tens of microseconds): a guess made from a torn input
would only read the wrong experts, never change a result.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..shared.mailbox import REQUEST, Slot
from .expert_kernel import c_kernel

# A lookahead from a layer that read nothing EMPTY times in a row (the next request came before its
# guess was made, or every guessed expert was the GPU's) is skipped for that layer's next SKIP
# requests, then tried again. With every layer through the pool the GPU's turn (~50 us on the lent
# hosts) is shorter than the guess takes there (Python ~30 us, router and top-k ~17), and the
# lookahead only kept the next request waiting: 58 -> 76-87 us a layer between answer and request.
EMPTY, SKIP = 8, 256
# Instead, the team's threads are held running (expert_kernel.c: krasis_hold) until the next request,
# for at most HOLD_S: longer than the GPU's turn between two layers of a step, shorter than a step's
# turn between tokens (sampling, the coordinator), which the pool's loop waits out in Python.
HOLD_S = 0.001

# Requests of a layer without an expert after which it is taken as run elsewhere. A cold expert of a
# balanced top-8-of-128 layer goes unasked that long with probability (15/16)^128, about 1e-4.
QUIET = 128


def l2_bytes(cpu: int = 0) -> int:
    """The L2 cache of one core (sysfs), 1 MiB where it cannot be read: the default share of each
    pool thread, since what it reads must still be in its caches when the kernel wants it."""
    for index in sorted(Path(f"/sys/devices/system/cpu/cpu{cpu}/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() == "2":
                text = (index / "size").read_text().strip()
                return int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]]
        except (OSError, ValueError, KeyError):
            break
    return 1 << 20


def bind(family, layout, store, node: int, get, threads: int) -> dict:
    """layer -> (the next MoE layer of the store, krasis_lookahead bound to that layer's block of
    experts on this node and its router); empty where the C kernel is not used (numba, or a dense
    store)."""
    c = c_kernel()
    if c is None or layout.fmt.kind not in ("int4", "int8"):
        return {}
    bits = int(layout.fmt.kind[3:])
    out = {}
    for layer, nxt in zip(layout.moe_layers, layout.moe_layers[1:]):
        a, b = layout.range(nxt, node)
        weight, bias = family.router_names(nxt)
        ahead = c.bind_lookahead(store.tensors(nxt, node), bits, a, b - a, threads, get(weight), bias and get(bias))
        if ahead is not None:
            out[layer] = (nxt, ahead)
    return out


class Lookahead:
    """`aheads`: layer -> (the next MoE layer, its bound krasis_lookahead: bind()); `first_count`:
    layer -> the pool's block of experts (first, count); `experts`: layer -> its number of experts.

    "The next layer" is the one the pool was asked for after this one the last time, within a step
    and from the same slot: with resident decode (the default on a GPU, and hcs_hybrid's whole hot
    layers) the GPU runs some layers itself, and the store's next MoE layer may never come to the
    pool. Until a layer has been followed once, the store's next MoE layer is guessed.

    `hold_threads`: the layer kernel's threads, held running while a layer's lookahead is skipped
    (HOLD_S); 0 holds nothing."""

    def __init__(self, aheads: dict, slots: list[Slot], budget: int, first_count: dict[int, tuple[int, int]],
                 experts: dict[int, int], hold_threads: int = 0):
        self.aheads, self.budget, self.first_count = aheads, budget, first_count
        self.targets = {nxt: ahead for nxt, ahead in aheads.values()}  # a layer -> the lookahead bound to it
        self.follows: dict[int, int] = {}  # layer -> the layer the pool was asked for after it
        self._previous: dict[int, int] = {}  # slot -> the layer of its last request
        # per layer: the request count, each expert's last request asking for it, and what may be read
        self.asked = {layer: 0 for layer in experts}
        self.last = {layer: np.full(n, -QUIET, dtype=np.int64) for layer, n in experts.items()}
        self.allowed = {layer: np.ones(n, dtype=np.uint8) for layer, n in experts.items()}
        # the request numbers of every slot: any new request ends the lookahead
        self.words = np.array([slot.hdr.ctypes.data + REQUEST * slot.hdr.itemsize for slot in slots], dtype=np.int64)
        self.seen = np.zeros(len(slots), dtype=np.int64)
        c = c_kernel() if aheads and hold_threads and slots else None
        self.hold = c.bind_hold(self.words, self.seen, hold_threads) if c is not None else None
        self._guess: dict[tuple[int, int], torch.Tensor] = {}  # (M, k) -> the int32 buffer the kernel writes its guess into
        self.pending: tuple[int, torch.Tensor] | None = None  # (layer, guess) awaiting that layer's request
        self.stats = {"lookahead_calls": 0, "lookahead_bytes": 0, "lookahead_prep_s": 0.0, "lookahead_skipped": 0,
                      "guessed": 0, "chosen": 0}
        self.empty: dict[int, int] = {}  # layer -> its lookaheads in a row that read nothing
        self.skip: dict[int, int] = {}  # layer -> how many of its next requests go without a lookahead

    def summary(self) -> dict:
        """`stats`, and `experts_asked`: how many experts of its block the requests of a layer have
        named since the pool started, on average over the layers it was asked for (near all of them
        after a few hundred decode tokens of balanced routing; a handful where the sampled tokens'
        routing collapsed)."""
        asked = [int((last >= 0).sum()) for last in self.last.values() if last.max() >= 0] if self.aheads else []
        return {**self.stats, "experts_asked": sum(asked) / len(asked) if asked else 0.0}

    def run(self, layer: int, x: torch.Tensor, ids: torch.Tensor, served: list[int], source: int = 0) -> None:
        """After answering a request for `layer` from slot `source` (its x and ids, still in the
        slot): score the guess made for it, then read ahead for the layer asked for next until a
        slot's request number differs from `served` (the numbers the pool has taken: one that came in
        meanwhile ends it at once)."""
        if not self.aheads:  # off, or nothing to read ahead with: no bookkeeping either
            return
        t0 = time.perf_counter()
        before = self._previous.get(source)
        if before is not None and before < layer:
            self.follows[before] = layer
        self._previous[source] = layer
        chosen = ids.view(-1).tolist()  # as Python ints once: at 8 ids, numpy's per-call costs dominate
        self._score(layer, chosen)
        self._note(layer, chosen)
        self.seen[:] = served  # the numbers that end a hold or a lookahead when they change
        if self.skip.get(layer):
            self.skip[layer] -= 1
            self.stats["lookahead_skipped"] += 1
            if self.hold is not None:
                self.hold(HOLD_S)
            return
        next_layer = self.follows.get(layer)
        if next_layer not in self.targets:
            if layer not in self.aheads:
                return
            next_layer = self.aheads[layer][0]
        ahead = self.targets[next_layer]
        if x.dtype == torch.float16:  # the kernel takes bf16 or float32; a guess needs no more precision
            x = x.float()
        m, k = ids.shape
        guess = self._guess.get((m, k))
        if guess is None:
            guess = self._guess[(m, k)] = torch.empty(m, k, dtype=torch.int32)
        allowed = None
        if self.asked[next_layer] >= QUIET:
            allowed = self.allowed[next_layer]
            np.greater_equal(self.last[next_layer], self.asked[next_layer] - QUIET, out=allowed, casting="unsafe")
        self.stats["lookahead_prep_s"] += time.perf_counter() - t0
        read = ahead(x, guess, self.words, self.seen, self.budget, allowed=allowed)
        self.stats["lookahead_bytes"] += read
        self.stats["lookahead_calls"] += 1
        self.pending = (next_layer, guess)
        self.empty[layer] = 0 if read else self.empty.get(layer, 0) + 1
        if self.empty[layer] >= EMPTY:
            self.empty[layer], self.skip[layer] = 0, SKIP

    def _note(self, layer: int, chosen: list[int]) -> None:
        """The experts this request for `layer` asked for (hot ones come as -1)."""
        last, asked = self.last[layer], self.asked[layer]
        for e in chosen:
            if 0 <= e < len(last):
                last[e] = asked
        self.asked[layer] = asked + 1

    def _score(self, layer: int, chosen: list[int]) -> None:
        """Of the experts of this block that the request for `layer` chose, how many the guess named."""
        pending, self.pending = self.pending, None
        if pending is None or pending[0] != layer:
            return
        first, count = self.first_count[layer]
        mine = {e for e in chosen if first <= e < first + count}
        self.stats["chosen"] += len(mine)
        self.stats["guessed"] += len(mine.intersection(pending[1].view(-1).tolist()))
