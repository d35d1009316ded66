"""Where a decode layer's GPU time goes, from a worker's Chrome trace (KRASIS_PROFILE_TRACE=1,
gpu_worker/profiling.py): the kernels by name, and the pool's hop cut into cycles. With --streams
(a prefill step's trace), each CUDA stream's busy time (kernels and copies, overlaps merged) against
the step's span instead of the cycles: whether the copies or the compute set the step.

A cycle runs from the end of one `_wait` kernel (the pool's reply seen on the device) to the end of
the next: the GPU's turn (its kernels and the idle gaps between them, up to the `_ring` that posts
the next request) and then the wait on the pool. The operator table (stage*-decode.txt) has the
kernels' durations but not the gaps, which on a decode layer of ~18 small kernels are most of it.

    python benchmarks/trace_summary.py DIR/stage0-decode.json [--show 1]
    python benchmarks/trace_summary.py DIR/stage0-prefill.json --streams
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict


def load(path: str) -> list[dict]:
    """The trace's timed GPU events (kernels, copies, memsets), in time order."""
    events = json.load(open(path))
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    return sorted(gpu, key=lambda e: e["ts"])


def streams(work: list[dict]) -> str:
    """Per stream: its kernels' and copies' busy time (intervals merged) and its share of the span."""
    start = min(e["ts"] for e in work)
    span = max(e["ts"] + e["dur"] for e in work) - start
    lines = [f"span {span / 1e3:.1f} ms"]
    for tid in sorted({e["tid"] for e in work}, key=str):
        mine = [e for e in work if e["tid"] == tid]
        busy, end = 0.0, start
        for e in mine:
            a, b = max(e["ts"], end), e["ts"] + e["dur"]
            busy += max(0.0, b - a)
            end = max(end, b)
        kinds = defaultdict(float)
        for e in mine:
            kinds[e["cat"]] += e["dur"]
        parts = ", ".join(f"{k} {v / 1e3:.1f} ms" for k, v in sorted(kinds.items()))
        lines.append(f"stream {tid}: busy {busy / 1e3:.1f} ms ({busy / span:.0%} of the span): {parts}")
    return "\n".join(lines)


def short(name: str) -> str:
    return name if len(name) <= 48 else name[:45] + "..."


def by_name(ks: list[dict]) -> str:
    total = defaultdict(float)
    count = defaultdict(int)
    for k in ks:
        total[k["name"]] += k["dur"]
        count[k["name"]] += 1
    span = ks[-1]["ts"] + ks[-1]["dur"] - ks[0]["ts"]
    lines = [f"{len(ks)} kernels over {span:.0f} us, busy {sum(total.values()):.0f} us", f"{'kernel':48} {'calls':>6} {'us':>10} {'us/call':>8}"]
    for name in sorted(total, key=total.get, reverse=True)[:30]:
        lines.append(f"{short(name):48} {count[name]:6d} {total[name]:10.1f} {total[name] / count[name]:8.2f}")
    return "\n".join(lines)


def cycles(ks: list[dict], show: int) -> str:
    """The pool hop's cycles: per cycle the turn (from a _wait's end to the next _ring's end), the
    turn's kernel time and its idle gaps, and the next _wait's duration."""
    ends = [i for i, k in enumerate(ks) if k["name"] == "_wait"]
    if len(ends) < 2:
        return "no pool hop in this trace (no _wait kernels)"
    rows = []
    shown = []
    for a, b in zip(ends, ends[1:]):
        start = ks[a]["ts"] + ks[a]["dur"]
        inner = ks[a + 1 : b]
        ring = [k for k in inner if k["name"] == "_ring"]
        if not ring or start > ring[-1]["ts"]:
            continue
        turn_end = ring[-1]["ts"] + ring[-1]["dur"]
        turn = [k for k in inner if k["ts"] + k["dur"] <= turn_end]
        busy = sum(k["dur"] for k in turn)
        rows.append((turn_end - start, busy, len(turn), ks[b]["dur"], ks[b]["ts"] - turn_end))
        if len(shown) < show:
            prev, lines = start, []
            for k in turn:
                lines.append(f"  {short(k['name']):48} {k['dur']:7.2f} us  gap {k['ts'] - prev:6.2f}")
                prev = k["ts"] + k["dur"]
            shown.append("\n".join(lines))
    if not rows:
        return "no complete cycle"
    med = [statistics.median(col) for col in zip(*rows)]
    out = [f"{len(rows)} cycles; medians: GPU turn {med[0]:.1f} us = kernels {med[1]:.1f} us ({med[2]:.0f} of them) "
           f"+ gaps {med[0] - med[1]:.1f} us; then until the next _wait starts {med[4]:.1f} us; _wait {med[3]:.1f} us"]
    for i, s in enumerate(shown):
        out.append(f"cycle {i}:\n{s}")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--show", type=int, default=1, help="cycles to list kernel by kernel")
    ap.add_argument("--streams", action="store_true", help="busy time per stream instead of the decode cycles")
    a = ap.parse_args()
    work = load(a.trace)
    ks = [e for e in work if e["cat"] == "kernel"]
    if not ks:
        print("no kernels in", a.trace)
        return
    print(by_name(ks))
    print()
    print(streams(work) if a.streams else cycles(ks, a.show))


if __name__ == "__main__":
    main()
