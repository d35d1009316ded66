"""CUDA graphs for decode steps.

A decode step of one token per sequence launches ~100 small kernels per layer; eagerly, each costs
6-10 us of host time plus Python, ~2.6 ms per layer on the lent H100 host against ~0.15 ms of device
work (graphed, an 8-layer Qwen3-30B-A3B decoded 2x faster: BENCHMARKS.md). A step is captured once
per batch size M and replayed after, as a program of parts:

    graph | eager | graph | eager | ... | graph

Most of a layer (norms, projections, rope, router, the hand-off to the CPU pool, whose request and
wait are kernels: doorbell_kernel.py) is a graph. Attention over a cache whose length and buffers
change every step cannot be frozen: the code that runs it calls `eager(fn, slices)`. While a step is
captured this ends the graph, runs fn, and starts the next graph; every replay then runs fn again at
that point with that step's slices. fn's tensors are copied into the ones it returned at capture,
which the following graphs read, unless fn writes into those itself (the attention output does). Any
other per-step input (tokens or hidden states, positions) sits in buffers the stage fills before a
replay. Nothing in a program waits for the host, so the host enqueues a whole step and runs ahead.

The graphs of one program share a memory pool and replay in the order they were captured, the
condition under which CUDA graphs may share memory. Outside a capture `eager(fn, slices)` is just
fn(slices), so the stage has one code path, graphed or not.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections import OrderedDict
from typing import Callable

import torch

from ..shared.protocol import SeqSlice

MAX_PROGRAMS = 8  # batch sizes whose graphs are kept (least recently used dropped)

_capturing: "_Program | None" = None  # the GPU worker is one thread: one capture at a time


def eager(fn: Callable, slices: list[SeqSlice] | None = None):
    """fn(slices), run outside any graph being captured, and again at every replay."""
    if _capturing is None:
        return fn(slices)
    return _capturing.cut(fn)


def _copy_into(dst, src) -> None:
    if isinstance(dst, torch.Tensor):
        if dst.data_ptr() != src.data_ptr():  # an eager part that writes in place returns it again
            dst.copy_(src)
    elif isinstance(dst, (list, tuple)):
        for d, s in zip(dst, src):
            _copy_into(d, s)


class _Eager:
    def __init__(self, fn: Callable, result):
        self.fn, self.result = fn, result

    def run(self, slices) -> None:
        _copy_into(self.result, self.fn(slices))


class _Program:
    """One batch size's captured step."""

    def __init__(self, device: torch.device):
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device)
        self.parts: list = []
        self.graph: torch.cuda.CUDAGraph | None = None
        self.slices: list[SeqSlice] = []
        self.out = None

    def capture(self, body: Callable, slices: list[SeqSlice]):
        global _capturing
        self.slices = slices
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            _capturing = self
            try:
                self._begin()
                self.out = body(slices)
                self._end()
            except BaseException:
                if self.graph is not None:
                    try:
                        self.graph.capture_end()
                    except RuntimeError:
                        pass  # an invalidated capture: the error that caused it is the one to report
                raise
            finally:
                _capturing = None
        torch.cuda.current_stream().wait_stream(self.stream)
        return self.out

    def _begin(self) -> None:
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a CUDA call from another thread of the process (a copy engine's) is not
        # part of this capture and must not invalidate it
        self.graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")

    def _end(self) -> None:
        g, self.graph = self.graph, None
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            g.capture_end()
        empty = False
        for w in said:
            if "The CUDA Graph is empty" in str(w.message):
                # an eager part that starts or ends the step, or follows another, leaves nothing
                # to capture, and an empty graph still costs a launch
                empty = True
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if not empty:
            g.replay()
            self.parts.append(g)

    def cut(self, fn: Callable):
        self._end()
        result = fn(self.slices)
        self.parts.append(_Eager(fn, result))
        self._begin()
        return result

    def replay(self, slices: list[SeqSlice]):
        for p in self.parts:
            if isinstance(p, _Eager):
                p.run(slices)
            else:
                p.replay()
        return self.out


class DecodeGraphs:
    """The captured decode steps of a stage, by batch size. `body(slices)` runs the stage's layers
    on `buffers(M)` and returns its output; a batch size's second step is captured, later ones
    replay (see ready())."""

    def __init__(self, device: torch.device, body: Callable, inputs: Callable[[int], dict[str, torch.Tensor]]):
        self.device, self.body, self.make_inputs = device, body, inputs
        self.programs: OrderedDict[int, _Program] = OrderedDict()
        self.inputs: dict[int, dict[str, torch.Tensor]] = {}
        self.seen: set[int] = set()
        self.eager_only: set[int] = set()

    def ready(self, slices: list[SeqSlice]) -> bool:
        """Whether this step runs as graphs: a plain decode step (one new token per sequence, its
        logits wanted) of a batch size met before. A batch size's first step runs eagerly, by the
        caller, on its own tensors: it compiles Triton kernels and creates cuBLAS handles, which
        must not happen in a capture, and it leaves no cache keyed on the input buffers (the rotary
        tables) that a capture would then take for already computed."""
        if not all(s.n == 1 and s.logits in ("last", "sample") for s in slices):
            return False
        m = len(slices)
        if m in self.programs or (m in self.seen and m not in self.eager_only):
            return True
        self.seen.add(m)
        return False

    def buffers(self, m: int) -> dict[str, torch.Tensor]:
        """The inputs of batch size m's steps, in place: the caller fills them before run()."""
        if m not in self.inputs:
            self.inputs[m] = self.make_inputs(m)
        return self.inputs[m]

    def run(self, slices: list[SeqSlice]):
        """Replay batch size m's step, or capture it (the capture also runs it)."""
        m = len(slices)
        if m in self.programs:
            self.programs.move_to_end(m)
            return self.programs[m].replay(slices)
        prog, t0 = _Program(self.device), time.perf_counter()
        try:
            out = prog.capture(self.body, slices)
        except Exception as e:
            # the step fails either way (its sequences are half through it); later steps of this
            # batch size run eagerly rather than fail the same way again
            self.eager_only.add(m)
            print(f"krasis: decode graph capture for batch size {m} failed ({type(e).__name__}: {e}); "
                  "running that batch size eagerly", file=sys.stderr)
            raise
        graphs = sum(not isinstance(p, _Eager) for p in prog.parts)
        print(f"krasis: decode graphs for batch size {m} on {self.device}: {graphs} graphs, "
              f"{len(prog.parts) - graphs} eager parts, captured in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
        self.programs[m] = prog
        if len(self.programs) > MAX_PROGRAMS:
            dropped, _ = self.programs.popitem(last=False)
            self.seen.discard(dropped)  # warmed again, eagerly, before its next capture (see ready())
        return out
