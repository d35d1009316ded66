"""A CPU expert pool process: one per (possibly simulated) NUMA node, its threads pinned to that
node's cores. It fills its node's segment of the shared expert store, then serves the GPU workers'
decode requests from its mailbox slots (shared/mailbox.py): run this node's block of a layer's
routed experts and write back the partial sum. Its ZeroMQ socket takes control messages only.

Started by the coordinator as `python -m krasis.cpu_worker SPEC_JSON`.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from itertools import zip_longest

import torch
import zmq

from ..shared import protocol as P
from ..shared.expert_store import ExpertStore, StoreLayout, fill_node
from ..shared.lifecycle import StartupMarks, die_with_parent, limit_threads
from ..shared.mailbox import Mailboxes, Slot, SlotShape
from .expert_kernel import kernel_clock, layer_kernel, pin_threads, set_threads, warm_up
from .lookahead import Lookahead, bind as bind_lookahead, l2_bytes
from ..shared.weight_cache import store_writer
from ..shared.weights import load_family, open_source

# While decode is under way the pool polls its mailbox slots without pause; after SPIN_S without work
# it waits on its control socket in POLL_MS naps (main() says why).
SPIN_S = 0.05
POLL_MS = 1


def main() -> None:
    mark = StartupMarks()
    mark("imports")
    spec = json.loads(sys.argv[1])
    die_with_parent(spec["parent_pid"])
    if spec.get("cores"):
        os.sched_setaffinity(0, spec["cores"])
    limit_threads(spec["threads"])
    node = spec["node"]
    ctx = zmq.Context()
    coord = ctx.socket(zmq.PUSH)
    coord.setsockopt(zmq.LINGER, 2000)
    coord.connect(spec["coord"])
    try:
        family = load_family(spec["model"])
        layout = StoreLayout.from_spec(family, spec["store"])
        store = ExpertStore(layout, spec["store"]["fds"])
        total = len(layout.moe_layers)

        def on_layer(layer):
            done = layout.moe_layers.index(layer) + 1
            coord.send_multipart(P.encode(P.Progress(role="cpu", rank=node, what="expert layers", done=done, total=total)))

        with store_writer(spec["store"], layout.fmt, family, spec["model"], spec["threads"]) as (write, threads):
            fill_node(store, node, write, on_layer=on_layer, threads=threads)
        mark("fill")
        boxes = Mailboxes(spec["mailbox"]["fd"], SlotShape(**spec["mailbox"]["shape"]), spec["mailbox"]["count"])
        slots = [boxes.slot(i) for i in spec["mailbox"]["slots"]]
        for slot in slots:  # the GPU workers may read the store from now on
            slot.mark_filled()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(spec["bind"])
    except Exception as e:
        traceback.print_exc()
        coord.send_multipart(P.encode(P.WorkerError(role="cpu", rank=node, step=-1, message=f"{type(e).__name__}: {e}")))
        coord.close()
        ctx.term()
        sys.exit(1)
    act = getattr(family, "expert_act", "silu")
    # The kernel's own threads do the work from here; torch's idle OpenMP pool would spin against them.
    set_threads(spec["threads"])
    limit_threads(1)
    # once for the process: entering torch.inference_mode() around each call cost ~3.6 us a layer
    torch.set_grad_enabled(False)
    # What this process has done, for the coordinator's stats (tests read batching and dispatch here);
    # pairs: the (token, choice) pairs of its block it ran (of calls' tokens x top-k offered to it).
    # Per call, on this process's clock: kernel_s the kernel; serve_s from seeing the request to
    # answering it (kernel_s plus this loop's own work); gap_s the wait since the previous answer when
    # the request is a later layer of the same step (the GPU worker's part of the hop: its layer's
    # work and both crossings, during which the lookahead runs), step_gap_s when it starts a new step;
    # after_s from answering to polling again (the lookahead and this loop's bookkeeping: a request
    # that comes sooner waits for it). The lookahead's own counters (lookahead.py) join these.
    work = {"node": node, "pid": os.getpid(), "cores": sorted(os.sched_getaffinity(0)), "calls": 0, "tokens": 0, "pairs": 0, "max_m": 0,
            "kernel_s": 0.0, "serve_s": 0.0, "gap_s": 0.0, "gaps": 0, "step_gap_s": 0.0, "step_gaps": 0, "after_s": 0.0}
    last = {"answered": None, "layer": -1}
    kernels = {}
    for layer in layout.moe_layers:
        first, count = _first_count(layout, layer, node)
        kernels[layer] = layer_kernel(store.tensors(layer, node), layout.fmt, first, count, act)
        if len(kernels) == 1:
            warm_up(kernels[layer], family.hidden_size, first)
            mark("kernel build, warm-up")
    # each thread's share of what the lookahead reads: what one core's L2 holds, unless told
    share = spec.get("lookahead_kb")
    budget = (l2_bytes(min(os.sched_getaffinity(0))) if share is None else share << 10) * spec["threads"]
    aheads = {}
    if budget:
        try:
            aheads = bind_lookahead(family, layout, store, node, open_source(spec["model"], spec["store"].get("gguf")).get,
                                    spec["threads"])
        except Exception as e:  # it only saves time: serve without it rather than not at all
            print(f"cpu_worker {node}: lookahead off: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    ahead = Lookahead(aheads, slots, budget, {layer: _first_count(layout, layer, node) for layer in layout.moe_layers},
                      {layer: family.experts(layer).num for layer in layout.moe_layers}, spec["threads"])
    # one core a thread, the caller's (this loop's) the first: see expert_kernel.c's krasis_pin
    work["pinned"] = pin_threads(sorted(os.sched_getaffinity(0)))
    mark("kernels bound")
    coord.send_multipart(
        P.encode(P.Ready(role="cpu", rank=node, pid=os.getpid(),
                         info={"bytes": layout.sizes[node], "experts": layout.fmt.describe(), "startup": mark.marks}))
    )

    def serve(slot: Slot, number: int, seen: float):
        """Run the slot's request; the kernel writes its reply into the slot in place. Returns the
        request's (layer, x, ids) once answered without error, else None."""
        layer, x, ids, weights, out = slot.take()
        run = kernels.get(layer)
        if run is None:
            slot.answer(number, error=f"layer {layer} has no routed experts here")
            return None
        try:
            t0 = time.perf_counter()
            pairs = run(x, ids, weights, out)
            t1 = time.perf_counter()
            slot.answer(number)
            t2 = time.perf_counter()
        except Exception as e:
            traceback.print_exc()
            slot.answer(number, error=f"{type(e).__name__}: {e}")
            return None
        m = x.shape[0]
        work.update(calls=work["calls"] + 1, tokens=work["tokens"] + m, pairs=work["pairs"] + pairs, max_m=max(work["max_m"], m),
                    kernel_s=work["kernel_s"] + t1 - t0, serve_s=work["serve_s"] + t2 - seen)
        if last["answered"] is not None:
            kind = "gap" if layer > last["layer"] else "step_gap"
            work[f"{kind}_s"] += seen - last["answered"]
            work[f"{kind}s"] += 1
        last.update(answered=t2, layer=layer)
        return layer, x, ids

    def control() -> bool:
        """One control message (stats, shutdown) from the coordinator; False on shutdown."""
        ident, *frames = sock.recv_multipart(copy=False)
        try:
            msg = P.decode(frames)
        except P.ProtocolError as e:
            sock.send_multipart([ident, *P.encode(P.WorkerError(role="cpu", rank=node, step=-1, message=str(e)))])
            return True
        if isinstance(msg, P.Shutdown):
            return False
        if isinstance(msg, P.Stats):
            for k, v in kernel_clock().items():  # summed here: the kernel's own sums restart at each read
                if k == "cpu_by_thread":
                    work["clock_cpu_by_thread"] = v
                elif isinstance(v, list):
                    work[f"clock_{k}"] = [a + b for a, b in zip_longest(work.get(f"clock_{k}", []), v, fillvalue=0.0)]
                else:
                    work[f"clock_{k}"] = work.get(f"clock_{k}", 0.0) + v
            sock.send_multipart([ident, *P.encode(P.StatsReply(stats={**work, **ahead.summary()}))])
        else:
            sock.send_multipart([ident, *P.encode(P.WorkerError(role="cpu", rank=node, step=-1, message=f"unexpected {msg.TYPE}"))])
        return True

    # Poll the slots without pause while decode is under way (a layer's request follows the last
    # reply by well under a millisecond); after SPIN_S without work, wait on the control socket in
    # POLL_MS naps, so an idle pool costs no core and the first layer of a step waits at most a nap.
    seen = [slot.request() for slot in slots]
    last_work, spins = time.monotonic(), 0
    while True:
        for i, slot in enumerate(slots):
            n = slot.request()
            if n != seen[i]:
                seen[i] = n
                done = serve(slot, n, time.perf_counter())
                if done is not None:  # its x and ids stay in the slot until the GPU worker's next request
                    ahead.run(*done, seen, i)
                    work["after_s"] += time.perf_counter() - last["answered"]
                last_work, spins = time.monotonic(), 0
        spins += 1
        if spins % 4096 == 0:
            idle = time.monotonic() - last_work > SPIN_S
            if sock.poll(POLL_MS if idle else 0) and not control():
                break
    sock.close()
    coord.close()
    ctx.term()


def _first_count(layout: StoreLayout, layer: int, node: int) -> tuple[int, int]:
    a, b = layout.range(layer, node)
    return a, b - a
