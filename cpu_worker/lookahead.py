"""The pool's lookahead: while the GPU worker runs its part of the next layer, read the experts that
layer will probably choose into the pool cores' caches (expert_kernel.c: krasis_lookahead says why
and how). After answering layer L, the pool takes layer L+1's router applied to layer L's input and
reads what its top-k names, each thread the rows the kernel will give it, until the next request
arrives. When that request is for layer L+1, its ids score the guess. The decode loop runs it
(decode_loop.c: after); this module holds its policy and what it is bound to.

The GPU worker makes that guess itself (decode_strategies.DecodeStrategy.guess) while the pool runs
layer L, and posts it in the slot after the request (shared/mailbox.py: the guess), for the layer it
knows it will send next: the pool then reads from the moment it answers. Made here instead (a slot
without a fresh guess: KRASIS_POOL_GUESS=0, another stage's requests), the router and top-k took
~14 us of the GPU's ~60 us turn on the lent H100 hosts (session 26) before the first read.

"The next layer" is the one the pool was asked for after this one the last time, within a step and
from the same slot: with resident decode (the default on a GPU, and hcs_hybrid's whole hot layers)
the GPU runs some layers itself, and the store's next MoE layer may never come to the pool. Until a
layer has been followed once, the store's next MoE layer is guessed.

With hcs_hybrid the GPU runs its hot experts itself and the pool is never asked for them (their ids
come masked), so reading them ahead would waste the turn: an expert a layer has not been asked for in
its last QUIET requests is left out of that layer's reads (taken as hot), until it is asked for again.

The input is read from the slot after the reply, while the GPU worker cannot yet write the next one
(it first runs attention and the router, tens of microseconds): a guess made from a torn input
would only read the wrong experts, never change a result.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .expert_kernel import c_kernel

# A lookahead from a layer that read nothing EMPTY times in a row (the next request came before its
# guess was made, or every guessed expert was the GPU's) is skipped for that layer's next SKIP
# requests, then tried again. With every layer through the pool the GPU's turn (~50 us on the lent
# hosts) was shorter than the guess took there while the pool's loop was Python (~30 us of it before
# the C call, router and top-k ~17), and the lookahead only kept the next request waiting: 58 -> 76-87
# us a layer between answer and request (session 24). In the C loop it reads (session 25).
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


def routers(family, layout, get) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
    """layer -> (router [E, H], bias [E] or None) of each MoE layer after the first (the layers a
    lookahead may guess); empty where the C kernel is not used (numba, or a dense store)."""
    if c_kernel() is None or layout.fmt.kind not in ("int4", "int8"):
        return {}
    out = {}
    for layer in layout.moe_layers[1:]:
        weight, bias = family.router_names(layer)
        out[layer] = (get(weight), bias and get(bias))
    return out
