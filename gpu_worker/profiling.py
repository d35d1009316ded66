"""Opt-in profiling of a GPU worker: with KRASIS_PROFILE=DIR, steps PREFILL and DECODE steps
(KRASIS_PROFILE_STEPS, default "2,16": 2 prefill and 16 decode steps after the first of each, which
compiles and warms; "1,8-23" profiles decode steps 8 to 23) run under torch.profiler, and each
worker writes DIR/stage{rank}-{prefill,decode}.txt: the operator table, with the stage's own
regions (attention, route, routed_experts, shared_expert, dense_mlp) as rows, and with
KRASIS_PROFILE_TRACE=1 also DIR/stage{rank}-{prefill,decode}.json, the timeline (Chrome trace
format: the gaps between kernels are in it, not in the table). Off by default: a serving process
pays nothing but a dictionary lookup."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch


class StepProfiler:
    def __init__(self, rank: int):
        self.dir = os.environ.get("KRASIS_PROFILE")
        self.rank = rank
        steps = os.environ.get("KRASIS_PROFILE_STEPS", "2,16").split(",")
        self.want = {False: _window(steps[0]), True: _window(steps[1])}
        self.seen = {False: 0, True: 0}
        self.prof = {False: None, True: None}

    def step(self, decode: bool):
        """A context manager around one step: a no-op unless this step is one to profile."""
        if not self.dir:
            return contextlib.nullcontext()
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
