"""The pool's lookahead: while the GPU worker runs its part of the next layer, read the experts that
layer will probably choose into the pool cores' caches (expert_kernel.c: krasis_lookahead says why
and how). After answering layer L, the pool applies layer L+1's router to layer L's input, still in
the slot, and reads what its top-k names, each thread the rows the kernel will give it, until the
next request arrives. When that request is for layer L+1, its ids score the guess (`stats`).

With hcs_hybrid the GPU runs its hot experts itself and the pool is never asked for them (their ids
come masked), so reading them ahead would waste the turn: an expert a layer has not been asked for in
its last QUIET requests is left out of that layer's reads (taken as hot), until it is asked for again.

The kernel's own threads do all of it the moment the answer is written (expert_kernel.c:
krasis_moe_layer_then), with the bookkeeping (scoring the last guess, noting the experts asked for)
done in C just before the answer: Python between the answer and the first byte read ahead took
most of the GPU worker's turn on a host with slower cores. The guess reads the input from the slot
after the reply, while the GPU worker cannot yet write the next one (it first runs attention and
the router, tens of microseconds): a guess made from a torn input would only read the wrong
experts, never change a result.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..shared.mailbox import ERROR, REPLY, REQUEST, Slot
from . import native
from .expert_kernel import c_kernel

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

    The pool asks `then(layer, slot, number, m, k, served)` for the Then (native.py) to run a request
    with: the C kernel scores the guess made for that layer, notes the experts asked for, answers the
    slot and looks ahead at the next layer, all by its own threads with nothing in between (the
    stats in `settle`). None where no lookahead is bound (numba, a dense store, or it is off).

    "The next layer" is the one the pool was asked for after this one the last time, within a step
    and from the same slot: with resident decode (or hcs_hybrid's whole hot layers) the GPU runs some
    layers itself, and the next MoE layer of the store may never come to the pool. Until a layer has
    been followed once, the next MoE layer is guessed."""

    def __init__(self, aheads: dict, slots: list[Slot], budget: int, first_count: dict[int, tuple[int, int]],
                 experts: dict[int, int]):
        self.aheads, self.budget, self.first_count = aheads, budget, first_count
        self.targets = {nxt: ahead for nxt, ahead in aheads.values()}  # a layer -> the lookahead bound to it
        self.follows: dict[int, int] = {}  # layer -> the layer the pool was asked for after it
        self._previous: dict[int, int] = {}  # slot id -> the layer of its last request
        # per layer: the request count, and each expert's last request asking for it (QUIET's record)
        self.asked = {layer: 0 for layer in experts}
        self.last = {layer: np.full(n, -QUIET, dtype=np.int64) for layer, n in experts.items()}
        # the request numbers of every slot: any new request ends the lookahead
        self.words = np.array([slot.hdr.ctypes.data + REQUEST * slot.hdr.itemsize for slot in slots], dtype=np.int64)
        self.seen = np.zeros(len(slots), dtype=np.int64)
        self._guess: dict[tuple[int, int], torch.Tensor] = {}  # (M, k) -> the int32 buffer the kernel writes its guess into
        self.pending: tuple[int, tuple[int, int]] | None = None  # (layer, (M, k)) of the guess awaiting that layer's request
        self._thens: dict[tuple, list] = {}  # (layer, slot id, M, k) -> [its Then, the layer it looks ahead at]
        self._prepared: dict[int, tuple[int, int]] = {}  # next layer -> the (M, k) its ahead_t holds
        self._target: int | None = None  # the layer the running request looks ahead at
        self.stats = {"lookahead_calls": 0, "lookahead_bytes": 0, "guessed": 0, "chosen": 0}

    def summary(self) -> dict:
        """`stats`, and `experts_asked`: how many experts of its block the requests of a layer have
        named since the pool started, on average over the layers it was asked for (near all of them
        after a few hundred decode tokens of balanced routing; a handful where the sampled tokens'
        routing collapsed)."""
        asked = [int((last >= 0).sum()) for last in self.last.values() if last.max() >= 0] if self.aheads else []
        return {**self.stats, "experts_asked": sum(asked) / len(asked) if asked else 0.0}

    def then(self, layer: int, slot: Slot, number: int, m: int, k: int, served: list[int]) -> native.Then | None:
        """The Then for request `number` of `slot`, for `layer` with M = m tokens of k choices;
        `served`: every slot's request number the pool has taken (one that differs ends the
        lookahead). Between the request and its kernel: what is fixed per (layer, slot, m, k) is set
        once, so a call sets a handful of fields."""
        if not self.aheads:  # off, or nothing to read ahead with: no bookkeeping either
            return None
        before = self._previous.get(id(slot))
        if before is not None and before < layer:
            self.follows[before] = layer
        self._previous[id(slot)] = layer
        key = (layer, id(slot), m, k)
        entry = self._thens.get(key)
        if entry is None:
            entry = self._thens[key] = [self._new_then(layer, slot, m, k), None]
        t = entry[0]
        t.number = number
        t.prev = self._guess[(m, k)].data_ptr() if self.pending == (layer, (m, k)) else None
        t.asked = self.asked[layer]
        t.bytes = t.guessed = t.chosen = 0
        target = self.follows.get(layer)
        if target not in self.targets:
            target = self.aheads[layer][0] if layer in self.aheads else None
        self._target = target
        if target is None:
            t.next = t.ahead = t.next_last = None
            entry[1] = None
            return t
        ahead = self.targets[target]
        if entry[1] != target:
            t.next, t.ahead, t.next_last = ahead.block_ptr, ahead.args_ptr, self.last[target].ctypes.data
            entry[1] = target
        self.seen[:] = served
        if self._prepared.get(target) != (m, k):  # its ahead_t was last filled for another M
            ahead.prepare(self._guess[(m, k)], self.words, self.seen, self.budget)
            self._prepared[target] = (m, k)
        t.quiet_from = self.asked[target] - QUIET if self.asked[target] >= QUIET else -1
        return t

    def _new_then(self, layer: int, slot: Slot, m: int, k: int) -> native.Then:
        base, size = slot.hdr.ctypes.data, slot.hdr.itemsize
        last = self.last[layer]
        if (m, k) not in self._guess:
            self._guess[(m, k)] = torch.full((m, k), -1, dtype=torch.int32)
        return native.Then(reply=base + REPLY * size, error=base + ERROR * size, last=last.ctypes.data, experts=len(last))

    def settle(self, layer: int, t: native.Then, m: int, k: int) -> None:
        """After the kernel ran with `t` (then()'s): its counts, and the guess it left pending."""
        self.asked[layer] += 1
        self.stats["guessed"] += t.guessed
        self.stats["chosen"] += t.chosen
        if t.next:
            self.stats["lookahead_calls"] += 1
            self.stats["lookahead_bytes"] += t.bytes
            self.pending = (self._target, (m, k))
        else:
            self.pending = None
