"""A GPU worker process: one pipeline stage. Its loop: receive a message on its inbound socket (from
the coordinator for stage 0, from the previous stage otherwise), do the work, pass the result on
(to the next stage, or logits to the coordinator from the last stage).

Started by the coordinator as `python -m krasis.gpu_worker SPEC_JSON`; the spec is documented in
coordinator/processes.py, which writes it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback

import torch
import zmq

from ..shared import protocol as P
from ..shared.expert_store import ExpertStore, StoreLayout, fill_node
from ..shared.keys import Curve
from ..shared.lifecycle import StartupMarks, fine_timers, worker_start
from ..shared.quant import QuantLinear
from ..shared.weight_cache import WeightCache, store_writer
from ..shared.weights import load_family, open_source
from .pool_client import PoolClient
from .profiling import PHASES, StepProfiler
from .experts import StageExperts
from .stage import Stage

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main() -> None:
    mark = StartupMarks()
    mark("imports")
    spec = json.loads(sys.argv[1])
    worker_start(spec, f"krasis-gpu{spec['rank']}")
    fine_timers()
    ctx = zmq.Context()
    coord = ctx.socket(zmq.PUSH)
    coord.setsockopt(zmq.LINGER, 2000)
    coord.connect(spec["coord"])
    rank = spec["rank"]
    # the worker's stderr is the coordinator's (the journal, under systemd): its rare INFO lines
    # (a decode route's choice, decode_route.py) say what it decided and why
    logging.basicConfig(level=logging.INFO, format=f"gpu_worker {rank}: %(levelname)s %(message)s")
    try:
        stage, inbound, nxt, curve = _start(spec, ctx, coord, mark)
    except Exception as e:
        coord.send_multipart(P.encode(P.WorkerError(role="gpu", rank=rank, step=-1, message=_one_line(e))))
        traceback.print_exc()
        coord.close()
        ctx.term()
        sys.exit(1)
    _serve(stage, rank, inbound, nxt, coord)
    for s in (inbound, nxt, coord):
        s.close()
    curve.close()
    stage.experts.close()
    ctx.term()


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0]


def _start(spec: dict, ctx: zmq.Context, coord, mark: StartupMarks) -> tuple[Stage, zmq.Socket, zmq.Socket, Curve]:
    rank, (a, b) = spec["rank"], spec["layers"]
    device = torch.device(spec["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = DTYPES[spec["dtype"]]
    family = load_family(spec["model"])
    source = open_source(spec["model"])  # what this stage reads itself; the routed experts come through the store
    layout = StoreLayout.from_spec(family, spec["store"])
    store = ExpertStore(layout, spec["store"]["fds"])
    if spec["store"].get("fill"):  # a store of the GPU's own format: this stage's layers are ours to fill
        with store_writer(spec["store"], layout.fmt, family, spec["model"], spec["threads"]) as (write, threads):
            fill_node(store, 0, write, layers=range(a, b), threads=threads)
    dense = WeightCache(spec["dense_cache"]) if spec.get("dense_cache") else None
    mark("store")

    total, done = (b - a) + 2, 0

    def progress():
        coord.send_multipart(P.encode(P.Progress(role="gpu", rank=rank, what="layers", done=done, total=total)))

    def get(name):
        if dense is not None and name + ".q" in dense:
            return QuantLinear(dense.tensor(name + ".q"), dense.tensor(name + ".s")).to(device)
        t = source.get(name)
        if device.type == "cuda" and t.element_size() == 2:
            # a 16-bit source (a GGUF's F16 attention and embeddings) crosses as it is and is cast on
            # the device: torch casts a host-to-device copy on the host, with this worker's two
            # threads and a fresh host copy whose pages fault in first (~0.5-2 s a GB on the dev
            # machine), where the device casts it in microseconds (the same round-to-nearest-even);
            # the peer GGUF's dense weights took 0.93 s so against 2.33 on an H100 host (session 39)
            return t.to(device).to(dtype)
        return t.to(device=device, dtype=dtype)

    stage = Stage(family, get, (a, b), rank == 0, rank == spec["world"] - 1, device, dtype, spec["max_context"],
                  spec.get("kv_dtype"), spec.get("prefill_chunk") or 4096)
    if dense is not None:
        dense.close()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the 16-bit sources' copies that get() cast on the device
    mark("dense weights")
    done += 1
    progress()
    pool = PoolClient(spec["mailbox"], device)
    # The pool starts beside this worker and fills the store meanwhile; pinning the store or copying
    # experts out of it waits for that (and the pool's first touch puts its pages on its node).
    pool.wait_filled()
    mark("pool's fill")
    stage.attach(StageExperts(spec, family, store, device, dtype, pool))
    mark("experts")
    done = total
    progress()

    curve = Curve(ctx, spec.get("keys"))  # a stage next to another host's talks to it over tcp
    inbound = ctx.socket(zmq.PULL)
    inbound.setsockopt(zmq.LINGER, 0)
    curve.bind(inbound, spec["in"])
    nxt = ctx.socket(zmq.PUSH)
    nxt.setsockopt(zmq.LINGER, 2000)
    curve.connect(nxt, spec["next"])
    info = {
        "layers": [a, b],
        "device": str(device),
        "weights_bytes": sum(t.numel() * t.element_size() for layer in stage.layers for t in layer.tensors()),
        **stage.experts.info(),
        "startup": mark.marks,
    }
    coord.send_multipart(P.encode(P.Ready(role="gpu", rank=rank, pid=os.getpid(), info=info)))
    return stage, inbound, nxt, curve


def _serve(stage: Stage, rank: int, inbound, nxt, coord) -> None:
    """The worker's loop. A decode step that arrives while the previous one is still on the device
    is launched behind it before the worker waits for that one, so the device goes from step to
    step without waiting for this loop (the coordinator sends a single stage's decode steps ahead:
    engine._decode); anything else waits for the step in flight first."""
    profiler = StepProfiler(rank)
    pending = None  # (message, t_in, Launched): on the device, not yet answered
    held = stage.experts.held()  # as Ready reported it: a change is reported as it happens

    def fail(msg, e: Exception) -> None:
        traceback.print_exc()
        # The sequences of a failed step are in an unknown state: drop them here; the
        # coordinator fails their requests and frees them on the other stages.
        stage.free([s.seq for s in msg.slices])
        coord.send_multipart(P.encode(P.WorkerError(role="gpu", rank=rank, step=msg.step, message=_one_line(e))))

    def answer(interrupt=None) -> bool:
        """Wait for the pending step and pass its results on; False, with the step still pending,
        as soon as `interrupt()` says a message is waiting."""
        nonlocal pending, held
        msg, t_in, step = pending
        try:
            if not stage.wait(step, interrupt):
                return False
        except Exception as e:
            pending = None
            fail(msg, e)
            return True
        pending = None
        PHASES.mark("gpu wait")
        if stage.last:
            reply = P.Logits(step=msg.step, t_in=t_in, t_out=time.monotonic(), tensors=step.out)
            coord.send_multipart(P.encode(reply), copy=False)
        else:
            fwd = P.Step(step=msg.step, slices=msg.slices, decode=msg.decode, tensors=step.out)
            nxt.send_multipart(P.encode(fwd), copy=False)
        PHASES.mark("reply")
        profiler.end_step()
        now = stage.experts.held()
        if now != held:
            held = now
            coord.send_multipart(P.encode(P.WorkerInfo(role="gpu", rank=rank, info=held)))
        return True

    while True:
        if pending is not None and answer(interrupt=lambda: bool(inbound.poll(0))):
            continue
        frames = inbound.recv_multipart(copy=False)
        t_in = time.monotonic()
        PHASES.mark("idle")
        msg = P.decode(frames)
        if pending is not None and not (isinstance(msg, P.Step) and msg.decode):
            answer()
        elif pending is not None:
            # a decode step goes behind the one in flight, unless that one is already done: its reply
            # first, then, or it would wait for this launch's host time (milliseconds where the host,
            # not the device, bounds a step), and the coordinator's next step with it
            answer(interrupt=lambda: True)
        if isinstance(msg, P.Shutdown):
            if not stage.last:
                nxt.send_multipart(P.encode(msg))
            profiler.close()
            return
        if isinstance(msg, P.Free):
            stage.free(msg.seqs)
            if not stage.last:
                nxt.send_multipart(P.encode(msg))
            continue
        if isinstance(msg, P.Fork):
            try:
                stage.fork(msg.seq, msg.into)
            except ValueError:  # logged; the choices' first decode step then fails, and with it their requests
                traceback.print_exc()
            if not stage.last:
                nxt.send_multipart(P.encode(msg))
            continue
        if not isinstance(msg, P.Step):
            coord.send_multipart(P.encode(P.WorkerError(role="gpu", rank=rank, step=-1, message=f"unexpected {msg.TYPE}")))
            continue
        try:
            x = msg.tensors["tokens" if stage.first else "hidden"]
            with profiler.step(msg.decode):
                step = stage.launch(x, msg.slices, msg.decode)
        except Exception as e:
            if pending is not None:
                answer()
            fail(msg, e)
            continue
        if pending is not None:
            answer()
        pending = (msg, t_in, step)
