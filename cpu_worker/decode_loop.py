"""The CPU pool's decode loop (decode_loop.c: krasis_loop) bound to this process's mailbox slots and
layers: it serves every request whose layer has a C kernel here, answers it, and runs the lookahead
(lookahead.py) after it, in C, until no request has come for a while; main.py serves what it
returns (error replies, the numba kernel's layers, fp16 x) and its control socket in between.

Its state lives in arrays held here, which the C loop reads and updates in place: the request
numbers taken, which layer followed which, each expert's last request per layer (QUIET), the
empty and skipped lookaheads per layer, and its counters (native.LOOP_STATS)."""

from __future__ import annotations

import ctypes

import numpy as np

from ..shared.mailbox import REQUEST, Slot
from . import native
from .lookahead import EMPTY, HOLD_S, QUIET, SKIP

# A wait for a request longer than this is idle time (a prefill, no request), not a step's turn: left out
# of the gap counters, by the C loop and main.py's alike.
IDLE_S = 0.05


def _pointers(values: list) -> ctypes.Array:
    return (ctypes.c_void_p * max(1, len(values)))(*values)


class DecodeLoop:
    """`kernels`: layer -> the bound call of its block here (layer_kernel: the C kernel's carries its
    block_t; others are served by the caller); `routers`: layer -> (router [E, H], bias [E] or None)
    of the layers the lookahead may guess; `experts`: layer -> its number of experts; `budget`: the
    lookahead's bytes a call (0: off); `next_layer`: layer -> the layer looked ahead at after it until
    the pool has seen which one follows."""

    def __init__(self, c: native.CKernel, slots: list[Slot], kernels: dict, routers: dict, experts: dict[int, int],
                 next_layer: dict[int, int], budget: int):
        shape = slots[0].shape
        layers = max(experts) + 1
        self._c = c
        self.seen = np.array([slot.request() for slot in slots], dtype=np.int64)
        self.words = np.array([slot.hdr.ctypes.data + REQUEST * slot.hdr.itemsize for slot in slots], dtype=np.int64)
        parts = (native.SlotParts * len(slots))(*(
            native.SlotParts(slot.hdr.ctypes.data, slot.x.data_ptr(), slot.ids.data_ptr(), slot.weights.data_ptr(),
                             slot.out.data_ptr(), slot.guess.data_ptr()) for slot in slots))
        blocks = [getattr(kernels.get(layer), "block", None) for layer in range(layers)]
        # layer -> the ahead_t of its router (the loop fills the rest of a copy per lookahead)
        heads = {layer: c.router_args(router, bias, blocks[layer].H) for layer, (router, bias) in routers.items()
                 if blocks[layer] is not None}
        self.next = np.array([next_layer.get(layer, -1) if next_layer.get(layer, -1) in heads else -1
                              for layer in range(layers)], dtype=np.int32)
        self.previous = np.full(len(slots), -1, dtype=np.int32)
        self.experts = np.array([experts.get(layer, 0) for layer in range(layers)], dtype=np.int32)
        self.last = [np.full(max(1, n), -QUIET, dtype=np.int64) for n in self.experts]
        self.asked = np.zeros(layers, dtype=np.int64)
        self.empty = np.zeros(layers, dtype=np.int32)
        self.skip = np.zeros(layers, dtype=np.int32)
        allowed = np.ones(max(1, int(self.experts.max())), dtype=np.uint8)
        guess = np.full(shape.max_m * shape.top_k, -1, dtype=np.int32)
        self.struct = native.Loop(
            len(slots), layers, shape.max_m, shape.top_k, ctypes.addressof(parts), self.words.ctypes.data,
            self.seen.ctypes.data, ctypes.addressof(blocks_arr := _pointers([b and ctypes.addressof(b) for b in blocks])),
            ctypes.addressof(routers_arr := _pointers([ctypes.addressof(heads[i]) if i in heads else None
                                                       for i in range(layers)])),
            self.next.ctypes.data, self.previous.ctypes.data, self.experts.ctypes.data,
            ctypes.addressof(last_arr := _pointers([a.ctypes.data for a in self.last])), self.asked.ctypes.data,
            self.empty.ctypes.data, self.skip.ctypes.data, allowed.ctypes.data, guess.ctypes.data,
            -1, -1, budget, QUIET, EMPTY, SKIP, HOLD_S, IDLE_S, 0.0)
        # what the struct points into, kept alive with it
        self._keep = (slots, parts, blocks, heads, blocks_arr, routers_arr, last_arr, allowed, guess)
        self._ptr = ctypes.addressof(self.struct)
        self.budget = budget

    def run(self, idle_s: float, max_s: float) -> int:
        """Serve until no request for idle_s (-1), or until max_s has passed when one comes (-2, not
        taken), or until slot i has a request the loop does not serve (i, not taken)."""
        return self._c.loop(self._ptr, idle_s, max_s)

    @property
    def served(self) -> int:
        """Requests the loop has served since it was bound."""
        return int(self.struct.stats[0])

    @property
    def pending(self) -> int:
        """The layer the last lookahead guessed (-1: none awaiting its request)."""
        return self.struct.pending

    def stats(self) -> dict:
        """The loop's counters (native.LOOP_STATS), and `experts_asked`: how many experts of its block
        the requests of a layer have named since the pool started, on average over the layers it was
        asked for (lookahead.py); 0 with the lookahead off, which alone tracks them."""
        out = {k: v if k.endswith("_s") else int(v) for k, v in zip(native.LOOP_STATS, self.struct.stats)}
        asked = [int((last >= 0).sum()) for last in self.last if last.max() >= 0] if self.budget else []
        out["experts_asked"] = sum(asked) / len(asked) if asked else 0.0
        return out
