"""Why bench's DRAM read moves between runs on one host: where the bytes are, or when they are read.

    python benchmarks/dram_read.py [--buffers 6] [--passes 3] [--gib 1] [--json F]

bench's decode floor divides the bytes a token reads by a float32 sum's rate over a fresh 1 GiB
buffer, taken before the workers start and after they stop (coordinator/bench.py: measure_dram).
On one lent H100 host that read came out at 88-142 GB/s across thirteen bench processes of one
session, while their decodes drew 75-86 GB/s of expert bytes (BENCHMARKS.md, session 39): the
fraction of the floor followed the read, not the decode. Two causes would look apart here:

- placement: each buffer's pages land on memory of another speed (a guest's one NUMA node may span
  its host's sockets): a buffer reads the same at every pass, and buffers differ;
- time: other tenants, the cores' clock: every buffer moves together from pass to pass.

So: --buffers fresh buffers, each read at each of --passes passes in turn (rows buffers, columns
passes); one buffer with 1 to all threads (what one core's misses draw; the pool runs 14); and a
buffer in a memfd mapped as the pool's store is (shared/expert_store.py: map_segment).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from krasis.coordinator.bench import read_rate
from krasis.shared.expert_store import map_segment


def store_like(nbytes: int) -> torch.Tensor:
    """Float32 ones in a memfd segment mapped as the pool's store maps its own."""
    fd = os.memfd_create("krasis-dram-read", 0)
    os.ftruncate(fd, nbytes)
    x = torch.frombuffer(map_segment(fd, nbytes), dtype=torch.float32)
    os.close(fd)  # the mapping keeps the segment
    x.fill_(1.0)
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--buffers", type=int, default=6)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=15, help="sums a measure, the fastest counted (as bench)")
    ap.add_argument("--json")
    a = ap.parse_args()
    nbytes = int(a.gib * (1 << 30)) // 4 * 4
    cores = torch.get_num_threads()
    gb = lambda x: read_rate(x, a.reps) / 1e9  # noqa: E731

    bufs = [torch.ones(nbytes // 4) for _ in range(a.buffers)]
    grid = [[gb(x) for x in bufs] for _ in range(a.passes)]  # grid[pass][buffer]
    print(f"{a.gib:g} GiB float32 sums, {cores} threads, fastest of {a.reps}: GB/s, a row per buffer, "
          "a column per pass")
    for b in range(a.buffers):
        print(f"  buffer {b}: " + "  ".join(f"{grid[p][b]:6.1f}" for p in range(a.passes)))
    spread = lambda v: max(v) - min(v)  # noqa: E731
    within = statistics.mean(spread([grid[p][b] for p in range(a.passes)]) for b in range(a.buffers))
    across = statistics.mean(spread(grid[p]) for p in range(a.passes))
    print(f"mean spread of a buffer over passes {within:.1f} GB/s; of a pass over buffers {across:.1f} "
          "(placement shows as the second far above the first)")

    threads = sorted({1, 2, 4, 8, 14, cores} & set(range(1, cores + 1)))
    by_threads = {}
    for t in threads:
        torch.set_num_threads(t)
        by_threads[t] = gb(bufs[0])
    torch.set_num_threads(cores)
    print("buffer 0 by threads: " + ", ".join(f"{t}: {r:.1f} ({r / t:.1f} a thread)" for t, r in by_threads.items()))

    shared = store_like(nbytes)
    store = [gb(shared) for _ in range(a.passes)]
    print("a memfd segment mapped as the store: " + ", ".join(f"{r:.1f}" for r in store))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"gib": a.gib, "threads": cores, "reps": a.reps, "grid_pass_buffer_gb_s": grid,
                       "spread_within_buffer_gb_s": within, "spread_across_buffers_gb_s": across,
                       "by_threads_gb_s": by_threads, "store_like_gb_s": store}, f, indent=1)


if __name__ == "__main__":
    main()
