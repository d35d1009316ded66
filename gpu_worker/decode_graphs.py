"""CUDA graphs for decode steps.

A decode step of one token per sequence launches ~100 small kernels per layer; eagerly, each costs
6-10 us of host time plus Python, ~2.6 ms per layer on the lent H100 host against ~0.15 ms of device
work (graphed, an 8-layer Qwen3-30B-A3B decoded 2x faster: BENCHMARKS.md). A step is captured once
per batch size M, as one graph, and replayed after.

Everything of a layer is in it: norms, projections, rope, router, the hand-off to the CPU pool (whose
request and wait are kernels: doorbell_kernel.py) and attention, whose kernels read where each
sequence's cache rows are from a table that the stage copies to a fixed buffer before each step
(kv_cache.begin_step). Any other per-step input (tokens or hidden states, positions) sits in buffers
the stage fills before a replay. Nothing in a step waits for the host, so the host enqueues a whole
step with one launch and runs ahead.
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from typing import Callable

import torch

from ..shared.protocol import SeqSlice

MAX_PROGRAMS = 8  # batch sizes whose graphs are kept (least recently used dropped)


class _Program:
    """One batch size's captured step."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device)
        self.graph = torch.cuda.CUDAGraph()
        self.out = None

    def capture(self, body: Callable, slices: list[SeqSlice]):
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            # thread_local: a CUDA call from another thread of the process (a copy engine's) is not
            # part of this capture and must not invalidate it
            self.graph.capture_begin(capture_error_mode="thread_local")
            try:
                self.out = body(slices)
            except BaseException:
                try:
                    self.graph.capture_end()
                except RuntimeError:
                    pass  # an invalidated capture: the error that caused it is the one to report
                raise
            self.graph.capture_end()
            self.graph.replay()  # a capture records the step; this runs it
        torch.cuda.current_stream().wait_stream(self.stream)
        return self.out

    def replay(self, slices: list[SeqSlice]):
        self.graph.replay()
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
        print(f"krasis: decode graphs for batch size {m} on {self.device}: captured in {time.perf_counter() - t0:.2f} s",
              file=sys.stderr)
        self.programs[m] = prog
        if len(self.programs) > MAX_PROGRAMS:
            dropped, _ = self.programs.popitem(last=False)
            self.seen.discard(dropped)  # warmed again, eagerly, before its next capture (see ready())
        return out
