"""CPU expert kernel against this machine's DRAM read bandwidth (issue 3).

    python benchmarks/cpu_experts.py [--threads N] [--gb 2.2] [--seconds 3]

1. The ceiling: DRAM read bandwidth, a float32 sum over a buffer of >= 2 GB with every thread.
2. cpu_worker/expert_kernel.moe_layer at M = 1 and M = 8 tokens on Qwen3-30B-A3B-shaped experts
   (hidden 2048, expert intermediate 768, 128 experts, top-8), INT4 and INT8 with groups of 128,
   one call per layer, rotating over enough layers that the weights total >= --gb GB, so an
   expert's weights are never in cache when read.
Weights read per call = the bytes (codes and scales) of the distinct experts its tokens chose.
The codes and scales are random: the kernel's work does not depend on their values.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from krasis.cpu_worker.expert_kernel import moe_layer, set_threads
from krasis.shared.expert_store import ExpertFormat
from krasis.shared.models.family import ExpertShape

HIDDEN, INTER, EXPERTS, TOP_K = 2048, 768, 128, 8


def dram_read_gbs(gb: float, reps: int = 5) -> float:
    buf = torch.ones(int(gb * 1e9) // 4, dtype=torch.float32)  # written once: pages are resident
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return buf.numel() * 4 / best / 1e9


def make_layers(fmt: ExpertFormat, gb: float, gen: torch.Generator) -> list[dict[str, torch.Tensor]]:
    spec = fmt.tensors(ExpertShape(EXPERTS, TOP_K, HIDDEN, INTER), EXPERTS)
    per_layer = sum(torch.empty((), dtype=d).element_size() * torch.Size(s).numel() for d, s in spec.values())
    layers = []
    for _ in range(max(2, -(-int(gb * 1e9) // per_layer))):
        t = {}
        for name, (dtype, shape) in spec.items():
            if name.endswith(".s"):  # scales of weights ~N(0, 0.02): max|w| / qmax
                t[name] = (torch.rand(shape, generator=gen) * 1e-2 + 1e-2).to(dtype)
            else:
                t[name] = torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8).view(dtype)
        layers.append(t)
    return layers


def expert_bytes(t: dict[str, torch.Tensor]) -> int:
    return sum(v[0].numel() * v.element_size() for v in t.values())


def bench(fmt: ExpertFormat, layers, m: int, seconds: float, gen: torch.Generator) -> tuple[float, float]:
    """(GB/s of weights read, ms per layer call)"""
    per_expert = expert_bytes(layers[0])
    x = torch.randn(m, HIDDEN, generator=gen).to(torch.bfloat16)
    w = torch.rand(m, TOP_K, generator=gen)
    calls = [torch.stack([torch.randperm(EXPERTS, generator=gen)[:TOP_K] for _ in range(m)]) for _ in range(64)]
    moe_layer(x, calls[0], w, layers[0], fmt, 0, EXPERTS)  # compile / load the cached kernel
    n, nbytes, elapsed = 0, 0, 0.0
    while elapsed < seconds:
        ids = calls[n % len(calls)]
        t = layers[n % len(layers)]
        t0 = time.perf_counter()
        moe_layer(x, ids, w, t, fmt, 0, EXPERTS)
        elapsed += time.perf_counter() - t0
        nbytes += len(torch.unique(ids)) * per_expert
        n += 1
    return nbytes / elapsed / 1e9, elapsed / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="threads (default: all cores)")
    ap.add_argument("--gb", type=float, default=2.2, help="GB of weights per format to rotate over (>= 2 keeps them out of cache)")
    ap.add_argument("--seconds", type=float, default=3.0, help="measured time per configuration")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    set_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"threads {args.threads}, torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}", flush=True)
    ceiling = dram_read_gbs(max(args.gb, 2.0))
    print(f"DRAM read (float32 sum over {max(args.gb, 2.0):.1f} GB): {ceiling:.1f} GB/s", flush=True)
    rows = []
    for kind in ("int4", "int8"):
        fmt = ExpertFormat(kind, group_size=128)
        layers = make_layers(fmt, args.gb, gen)
        total = len(layers) * EXPERTS * expert_bytes(layers[0]) / 1e9
        print(f"{kind}: {len(layers)} layers, {total:.2f} GB of expert weights", flush=True)
        torch.set_num_threads(1)  # as in the pool process: torch's idle OpenMP threads would spin against the kernel's
        for m in (1, 8):
            gbs, ms = bench(fmt, layers, m, args.seconds, gen)
            rows.append((kind, m, ms, gbs, gbs / ceiling))
            print(f"  M={m}: {ms:.3f} ms/layer, {gbs:.1f} GB/s, {gbs / ceiling:.0%} of DRAM read", flush=True)
        del layers
        torch.set_num_threads(args.threads)
    print(f"\n| format | M | ms / layer | weights GB/s | fraction of {ceiling:.1f} GB/s |")
    print("|---|---|---|---|---|")
    for kind, m, ms, gbs, frac in rows:
        print(f"| {kind} | {m} | {ms:.3f} | {gbs:.1f} | {frac:.0%} |")


if __name__ == "__main__":
    main()
