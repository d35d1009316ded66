"""Opt-in profiling of a GPU worker: with KRASIS_PROFILE=DIR, steps PREFILL and DECODE steps
(KRASIS_PROFILE_STEPS, default "2,16": 2 prefill and 16 decode steps after the first of each, which
compiles and warms; "1,8-23" profiles decode steps 8 to 23) run under torch.profiler, and each
worker writes DIR/stage{rank}-{prefill,decode}.txt: the operator table, with the stage's own
regions (attention, route, routed_experts, shared_expert, dense_mlp) as rows, and with
KRASIS_PROFILE_TRACE=1 also DIR/stage{rank}-{prefill,decode}.json, the timeline (Chrome trace
format: the gaps between kernels are in it, not in the table). The host's own time in decode steps
after that window goes by phase (PHASES) to DIR/stage{rank}-phases.txt when the worker shuts down.
Off by default: a serving process pays nothing but a dictionary lookup and a few empty calls."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import torch


class Phases:
    """The host's time in a worker's step loop by phase: mark(name) charges the time since the
    previous mark to `name`; commit() ends a step, kept in the totals or not (a step under
    torch.profiler, whose overhead would distort it, or a prefill step)."""

    def __init__(self, on: bool):
        self.on = on
        self.t = time.perf_counter()
        self.step: dict[str, float] = {}
        self.total: dict[str, float] = {}
        self.steps = 0

    def mark(self, name: str) -> None:
        if self.on:
            now = time.perf_counter()
            self.step[name] = self.step.get(name, 0.0) + now - self.t
            self.t = now

    def commit(self, keep: bool) -> None:
        if keep:
            for k, v in self.step.items():
                self.total[k] = self.total.get(k, 0.0) + v
            self.steps += 1
        self.step = {}

    def table(self) -> str:
        n = max(self.steps, 1)
        return f"host time per decode step by phase, us ({self.steps} steps)\n" + "\n".join(
            f"{k:>12} {1e6 * v / n:10.1f}" for k, v in self.total.items())


PHASES = Phases(bool(os.environ.get("KRASIS_PROFILE")))


class StepProfiler:
    def __init__(self, rank: int):
        self.dir = os.environ.get("KRASIS_PROFILE")
        self.rank = rank
        steps = os.environ.get("KRASIS_PROFILE_STEPS", "2,16").split(",")
        self.want = {False: _window(steps[0]), True: _window(steps[1])}
        self.seen = {False: 0, True: 0}
        self.prof = {False: None, True: None}
        self.timed = False  # whether the step under way counts in PHASES

    def step(self, decode: bool):
        """A context manager around one step: a no-op unless this step is one to profile."""
        if not self.dir:
            return contextlib.nullcontext()
        # only decode steps after the window count: before it lie the warm-up step, the CUDA graphs'
        # capture and the bench's warm-up request, whose host time is not a served step's
        self.timed = decode and self.prof[False] is None and self.seen[True] > self.want[True][1]
        if self.prof[not decode] is not None:
            return contextlib.nullcontext()  # one profiler at a time: the other kind is being profiled
        n = self.seen[decode]  # 0 is the warm-up step
        self.seen[decode] += 1
        first, last = self.want[decode]
        if not first <= n <= last:
            return contextlib.nullcontext()
        if n == first:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof[decode] = torch.profiler.profile(activities=acts)
            self.prof[decode].__enter__()
        return _Finish(self, decode) if n == last else contextlib.nullcontext()

    def end_step(self) -> None:
        """After a step's reply: its phases kept if it was a decode step after the window."""
        PHASES.commit(self.timed)
        self.timed = False

    def close(self) -> None:
        if self.dir and PHASES.steps:
            out = Path(self.dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"stage{self.rank}-phases.txt").write_text(PHASES.table() + "\n")

    def _write(self, decode: bool) -> None:
        p = self.prof[decode]
        p.__exit__(None, None, None)
        self.prof[decode] = None
        kind = "decode" if decode else "prefill"
        first, last = self.want[decode]
        sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
        text = (f"{kind} steps {first}..{last}\n\n" + p.key_averages().table(sort_by="cpu_time_total", row_limit=45)
                + "\n\n" + p.key_averages().table(sort_by=sort, row_limit=30))
        out = Path(self.dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"stage{self.rank}-{kind}.txt").write_text(text)
        if os.environ.get("KRASIS_PROFILE_TRACE") == "1":
            p.export_chrome_trace(str(out / f"stage{self.rank}-{kind}.json"))


def _window(spec: str) -> tuple[int, int]:
    """'16' -> steps 1..16; '8-23' -> steps 8..23 (later steps: a window clear of other requests' prefill)."""
    first, _, last = spec.partition("-")
    return (int(first), int(last)) if last else (1, int(first))


class _Finish:
    def __init__(self, prof: StepProfiler, decode: bool):
        self.p, self.decode = prof, decode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.p._write(self.decode)
