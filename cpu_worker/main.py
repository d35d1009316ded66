"""A CPU expert pool process: one per (possibly simulated) NUMA node, its threads pinned to that
node's cores. It fills its node's segment of the shared expert store, then serves ExpertWork from
GPU workers: run this node's block of a layer's routed experts and return the partial sum.

Started by the coordinator as `python -m krasis.cpu_worker SPEC_JSON`.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import torch
import zmq

from ..shared import protocol as P
from ..shared.expert_store import ExpertFormat, ExpertStore, StoreLayout, fill_node
from ..shared.lifecycle import die_with_parent, limit_threads
from .expert_kernel import moe_layer, set_threads, warm_up
from ..shared.weight_cache import store_writer
from ..shared.weights import load_family

def main() -> None:
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
        layout = StoreLayout(family, spec["store"]["nodes"], ExpertFormat.from_spec(spec["store"]["format"]))
        store = ExpertStore(layout, spec["store"]["fds"])
        total = len(layout.moe_layers)

        def on_layer(layer):
            done = layout.moe_layers.index(layer) + 1
            coord.send_multipart(P.encode(P.Progress(role="cpu", rank=node, what="expert layers", done=done, total=total)))

        with store_writer(spec["store"], layout.fmt, family, spec["model"]) as write:
            fill_node(store, node, write, on_layer=on_layer)
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
    # What this process has done, for the coordinator's stats (tests read batching and dispatch here).
    work = {"node": node, "pid": os.getpid(), "cores": sorted(os.sched_getaffinity(0)), "calls": 0, "tokens": 0, "max_m": 0,
            "kernel_s": 0.0}
    blocks = {layer: (*_first_count(layout, layer, node), store.tensors(layer, node)) for layer in layout.moe_layers}
    for first, count, t in list(blocks.values())[:1]:
        warm_up(t, layout.fmt, first, count, act)
    coord.send_multipart(
        P.encode(P.Ready(role="cpu", rank=node, pid=os.getpid(), info={"bytes": layout.sizes[node], "experts": layout.fmt.describe()}))
    )
    while True:
        ident, *frames = sock.recv_multipart(copy=False)
        try:
            msg = P.decode(frames)
        except P.ProtocolError as e:
            sock.send_multipart([ident, *P.encode(P.ExpertResult(tag=-1, error=str(e)))])
            continue
        if isinstance(msg, P.Shutdown):
            break
        if isinstance(msg, P.Stats):
            sock.send_multipart([ident, *P.encode(P.StatsReply(stats=work))])
            continue
        if not isinstance(msg, P.ExpertWork) or msg.layer not in blocks:
            sock.send_multipart([ident, *P.encode(P.ExpertResult(tag=getattr(msg, "tag", -1), error=f"bad work {msg.TYPE}"))])
            continue
        first, count, t = blocks[msg.layer]
        try:
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = moe_layer(msg.tensors["x"], msg.tensors["ids"], msg.tensors["weights"], t, layout.fmt, first, count, act)
            m = msg.tensors["x"].shape[0]
            work.update(calls=work["calls"] + 1, tokens=work["tokens"] + m, max_m=max(work["max_m"], m),
                        kernel_s=work["kernel_s"] + time.perf_counter() - t0)
            reply = P.ExpertResult(tag=msg.tag)
            reply.tensors = {"out": out}
        except Exception as e:
            traceback.print_exc()
            reply = P.ExpertResult(tag=msg.tag, error=f"{type(e).__name__}: {e}")
        sock.send_multipart([ident, *P.encode(reply)], copy=False)
    sock.close()
    coord.close()
    ctx.term()


def _first_count(layout: StoreLayout, layer: int, node: int) -> tuple[int, int]:
    a, b = layout.range(layer, node)
    return a, b - a
