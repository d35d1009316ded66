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

import numpy as np
import torch
import zmq

from ..shared import protocol as P
from ..shared.expert_store import ExpertStore, StoreLayout, fill_node
from ..shared.lifecycle import StartupMarks, limit_threads, worker_start
from ..shared.mailbox import Mailboxes, Slot, SlotShape
from .decode_loop import IDLE_S, DecodeLoop
from .expert_kernel import c_kernel, kernel_clock, layer_kernel, pin_threads, set_threads, warm_up
from .lookahead import l2_bytes, routers
from .native import LOOP_STATS
from ..shared.weight_cache import store_writer
from ..shared.weights import load_family, open_source

# While decode is under way the pool polls its mailbox slots without pause (in C: decode_loop.c), its
# control socket every SPIN_S; after SPIN_S without work it waits on that socket in POLL_MS naps
# (main() says why).
SPIN_S = 0.05
POLL_MS = 1


def main() -> None:
    mark = StartupMarks()
    mark("imports")
    spec = json.loads(sys.argv[1])
    worker_start(spec, f"krasis-cpu{spec['node']}")
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

        kept = spec["store"].get("filled", False)  # a group before this one filled it (coordinator/processes.py: KeptStores)
        if not kept:
            with store_writer(spec["store"], layout.fmt, family, spec["model"], spec["threads"]) as (write, threads):
                fill_node(store, node, write, on_layer=on_layer, threads=threads)
        store.seal()
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
    # work and both crossings, during which the lookahead runs), step_gap_s when it starts a new step
    # (waits over IDLE_S left out: the pool was idle, e.g. during a prefill) and step_kernel_s its kernel;
    # after_s from answering to polling again (the lookahead and this loop's bookkeeping: a request
    # that comes sooner waits for it). These are the requests this Python loop serves; the C loop
    # (decode_loop.c) keeps the same counters and the lookahead's for the rest, summed at each stats.
    work = {"node": node, "pid": os.getpid(), "cores": sorted(os.sched_getaffinity(0)), "calls": 0, "tokens": 0, "pairs": 0, "max_m": 0,
            "kernel_s": 0.0, "serve_s": 0.0, "gap_s": 0.0, "gaps": 0, "step_gap_s": 0.0, "step_gaps": 0, "step_kernel_s": 0.0,
            "after_s": 0.0}
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
    guessed = {}
    if budget:
        try:
            guessed = routers(family, layout, open_source(spec["model"], spec["store"].get("gguf")).get)
        except Exception as e:  # it only saves time: serve without it rather than not at all
            print(f"cpu_worker {node}: lookahead off: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    loop = None
    c = c_kernel()
    if c is not None and any(hasattr(run, "block") for run in kernels.values()):
        moe = layout.moe_layers
        loop = DecodeLoop(c, slots, kernels, guessed, {layer: family.experts(layer).num for layer in moe},
                          dict(zip(moe, moe[1:])), budget if guessed else 0)
    # one core a thread, the caller's (this loop's) the first: see expert_kernel.c's krasis_pin
    work["pinned"] = pin_threads(sorted(os.sched_getaffinity(0)))
    mark("kernels bound")
    coord.send_multipart(
        P.encode(P.Ready(role="cpu", rank=node, pid=os.getpid(),
                         info={"bytes": layout.sizes[node], "experts": layout.fmt.describe(), "startup": mark.marks,
                               "store": "kept" if kept else "filled"}))
    )

    def serve(slot: Slot, number: int, seen: float) -> None:
        """Run the slot's request (one the C loop does not serve); the kernel writes its reply into the
        slot in place."""
        layer, x, ids, weights, out = slot.take()
        run = kernels.get(layer)
        if run is None:
            slot.answer(number, error=f"layer {layer} has no routed experts here")
            return
        try:
            t0 = time.perf_counter()
            pairs = run(x, ids, weights, out)
            t1 = time.perf_counter()
            slot.answer(number)
            t2 = time.perf_counter()
        except Exception as e:
            traceback.print_exc()
            slot.answer(number, error=f"{type(e).__name__}: {e}")
            return
        m = x.shape[0]
        work.update(calls=work["calls"] + 1, tokens=work["tokens"] + m, pairs=work["pairs"] + pairs, max_m=max(work["max_m"], m),
                    kernel_s=work["kernel_s"] + t1 - t0, serve_s=work["serve_s"] + t2 - seen)
        if last["answered"] is not None and seen - last["answered"] < IDLE_S:
            kind = "gap" if layer > last["layer"] else "step_gap"
            work[f"{kind}_s"] += seen - last["answered"]
            work[f"{kind}s"] += 1
            if kind == "step_gap":
                work["step_kernel_s"] += t1 - t0
        last.update(answered=t2, layer=layer)
        work["after_s"] += time.perf_counter() - t2

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
            sock.send_multipart([ident, *P.encode(P.StatsReply(stats=_merged(work, loop)))])
        else:
            sock.send_multipart([ident, *P.encode(P.WorkerError(role="cpu", rank=node, step=-1, message=f"unexpected {msg.TYPE}"))])
        return True

    # Poll the slots without pause while decode is under way (a layer's request follows the last
    # reply by well under a millisecond); after SPIN_S without work, wait on the control socket in
    # POLL_MS naps, so an idle pool costs no core and the first layer of a step waits at most a nap.
    seen = loop.seen if loop is not None else np.array([slot.request() for slot in slots], dtype=np.int64)

    def poll(idle_s: float, max_s: float) -> int:
        """krasis_loop's contract where there is no C loop: the first slot with a request, not taken,
        or -1 after idle_s without one (max_s: nothing to serve here, so no turn to end)."""
        t0 = time.perf_counter()
        while True:
            for i, slot in enumerate(slots):
                if slot.request() != seen[i]:
                    return i
            if time.perf_counter() - t0 > idle_s:
                return -1

    run = loop.run if loop is not None else poll
    idle = False
    while True:
        served = loop.served if loop is not None else 0
        i = run(0.0 if idle else SPIN_S, SPIN_S)
        if i >= 0:
            seen[i] = slots[i].request()
            serve(slots[i], int(seen[i]), time.perf_counter())
        idle = still_idle(i, loop is not None and loop.served != served)
        if sock.poll(POLL_MS if idle else 0) and not control():
            break
    sock.close()
    coord.close()
    ctx.term()


def still_idle(returned: int, served: bool) -> bool:
    """Whether the pool naps on its control socket after a run of its loop (krasis_loop, or main's
    poll where there is none) that `returned` and `served` requests or not: only when it came back
    for want of requests (-1) having served none. A pool that stayed idle once it had served a
    request from a nap (session 25's fourth call) napped POLL_MS before every later request whose
    lookahead had ended before it came: ~1.1 ms a layer with the lookahead off, and before each
    step's first layer with it on."""
    return returned == -1 and not served


def _merged(work: dict, loop: DecodeLoop | None) -> dict:
    """The Python loop's counters and the C loop's, summed (the largest M: the larger)."""
    out = dict(work)
    for k, v in (loop.stats() if loop is not None else {**dict.fromkeys(LOOP_STATS, 0), "experts_asked": 0.0}).items():
        out[k] = max(out.get(k, 0), v) if k in ("max_m", "experts_asked") else out.get(k, 0) + v
    return out


def _first_count(layout: StoreLayout, layer: int, node: int) -> tuple[int, int]:
    a, b = layout.range(layer, node)
    return a, b - a
