"""CPU expert kernels against this machine's DRAM read bandwidth (issue 3).

    python benchmarks/cpu_experts.py [--threads N] [--gb 2.2] [--seconds 3] [--c-flags "-DPREFETCH=0" ...]
        [--kernels c] [--pages small|huge|shared]

1. The ceiling: DRAM read bandwidth, a float32 sum over a buffer of >= 2 GB with every thread.
2. The layer kernels of cpu_worker/expert_kernel.py side by side, the C kernel (expert_kernel.c,
   through moe_layer as the pool calls it) and the numba one, at M = 1 and M = 8 tokens on
   Qwen3-30B-A3B-shaped experts (hidden 2048, expert intermediate 768, 128 experts, top-8), INT4
   and INT8 with groups of --group-size (128), one call per layer, rotating over enough layers that the weights
   total >= --gb GB, so an expert's weights are never in cache when read. Each --c-flags adds a
   build of the C kernel with those extra compiler flags (e.g. -DPREFETCH=4096) as another row.
3. Decode's rhythm (--gap-us): the C kernel at M = 1, each call followed by a wait of the GPU
   worker's turn (attention and router of the next layer: ~90 us on the H200 hosts), during which
   the pool either idles or runs its lookahead (expert_kernel.c: krasis_lookahead) on the next
   layer's experts, with a guess that names --right of its top-k correctly (the rest random
   wrong experts). The figure is the layer's time (kernel plus turn) against the floor, the
   layer's bytes at the DRAM ceiling, as a decode step's floor counts it.
4. Each kernel's arithmetic alone: one thread, M = 1, one expert whose weights stay in cache, in
   G weights/s; times the threads, against the ceiling in weights/s, it tells whether a kernel that
   falls short of the ceiling is compute-bound. A Qwen3-30B-A3B expert may not fit a core's L2 (the
   lent Xeons' is 2 MB), so the rate is also taken in L2: from two smaller experts' calls, whose
   difference leaves out a call's fixed work.
--pages puts the weights and the ceiling's buffer on 4 KiB pages, 2 MiB ones, or the shared memory the
pool's store uses: on 4 KiB pages a layer's ~19 MB span ~4,600 pages, each first read walking the page
tables (two levels of them inside a VM, as on the lent hosts).
Weights read per call = the bytes (codes and scales) of the distinct experts its tokens chose.
The codes and scales are random: the kernels' work does not depend on their values. Before timing,
each kernel's result on those weights is checked against shared/moe.py:moe_reference, for float32
and for bf16 x (the timed case), except the C kernel's INT4 with bf16 x: that runs its Q8 path
(activations quantized to int8 per group; vpdpbusd with AVX512-VNNI, vpmaddubsw with AVX2), checked
against moe_reference_q8. The C kernel's SIMD width and Q8 instructions depend on the machine it is
built on, so this is its check there.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shlex
import time

import numpy as np
import torch

from krasis.cpu_worker import native
from krasis.cpu_worker.expert_kernel import moe_layer, set_threads
from krasis.cpu_worker.lookahead import l2_bytes
from krasis.shared.expert_store import ExpertFormat, map_segment
from krasis.shared.models.family import ExpertShape
from krasis.shared.moe import moe_reference, moe_reference_q8

HIDDEN, INTER, EXPERTS, TOP_K = 2048, 768, 128, 8
SMALL_INTER = (64, 256)  # the rows of the experts whose weights stay in L2 (main says why)
TOLERANCE = 1e-4  # of the output's largest magnitude: float32 sums in another order, over K = 2048
# bf16 x, against the float32 reference on the same values: out is rounded to bf16 (up to 2^-8 =
# 3.9e-3 of the largest magnitude; 2-3.5e-3 measured)
TOLERANCE_BF16 = 1e-2
# the C kernel's Q8 path against moe_reference_q8 (float32): the same integers, float32 sums in
# another order, then out's bf16 rounding (up to 3.9e-3), and now and then one of the activation's
# roundings to int8 going the other way (1e-3 or less)
TOLERANCE_Q8 = 5e-3
Q8_PATHS = {1: "Q8 on vpdpbusd (AVX512-VNNI, or AVX-VNNI without AVX-512)", 2: "Q8 on vpmaddubsw (AVX2, no VNNI)"}


def page_buffer(nbytes: int, pages: str) -> torch.Tensor:
    """nbytes of memory as a uint8 tensor, on pages of the kind --pages names: "small", private memory
    as torch allocates it (4 KiB pages where transparent_hugepage/enabled is "madvise", the lent hosts'
    setting); "huge", private memory asking for 2 MiB pages (MADV_HUGEPAGE), which that setting gives;
    "shared", a memfd mapped as the pool's expert store maps its segments (its MADV_HUGEPAGE is what
    transparent_hugepage/shmem_enabled allows: 4 KiB pages at "never", the lent hosts' setting)."""
    if pages == "small":
        return torch.empty(nbytes, dtype=torch.uint8)
    if pages == "shared":
        fd = os.memfd_create("cpu-experts", 0)
        os.ftruncate(fd, nbytes)
        m = map_segment(fd, nbytes)
        os.close(fd)
    else:
        m = mmap.mmap(-1, nbytes, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, mmap.PROT_READ | mmap.PROT_WRITE)
        m.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(m, dtype=torch.uint8)  # holds m


def huge_pages_mb() -> str:
    """This process's memory on 2 MiB pages (private, shared), from /proc/self/smaps_rollup."""
    kb = {}
    for line in open("/proc/self/smaps_rollup"):
        name, _, rest = line.partition(":")
        if name in ("AnonHugePages", "ShmemPmdMapped"):
            kb[name] = int(rest.split()[0])
    return f"{kb.get('AnonHugePages', 0) >> 10} MiB private, {kb.get('ShmemPmdMapped', 0) >> 10} MiB shared"


def in_pages(t: torch.Tensor, pages: str) -> torch.Tensor:
    """t copied onto pages of the kind --pages names (page_buffer)."""
    if pages == "small":
        return t
    out = page_buffer(t.numel() * t.element_size(), pages).view(t.dtype).view(t.shape)
    return out.copy_(t)


def dram_read_gbs(gb: float, pages: str, reps: int = 5) -> tuple[float, str]:
    """(GB/s, what of the buffer lay on 2 MiB pages)"""
    buf = page_buffer(int(gb * 1e9) // 4 * 4, pages).view(torch.float32).fill_(1.0)  # written once: pages are resident
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return buf.numel() * 4 / best / 1e9, huge_pages_mb()


def make_layers(fmt: ExpertFormat, gb: float, gen: torch.Generator, pages: str, experts: int = EXPERTS,
                inter: int = INTER, count: int | None = None) -> list[dict[str, torch.Tensor]]:
    """`count` layers of random experts, by default enough (and at least 2) to hold `gb` GB."""
    spec = fmt.tensors(ExpertShape(experts, TOP_K, HIDDEN, inter), experts)
    per_layer = sum(torch.empty((), dtype=d).element_size() * torch.Size(s).numel() for d, s in spec.values())
    layers = []
    for _ in range(count or max(2, -(-int(gb * 1e9) // per_layer))):
        t = {}
        for name, (dtype, shape) in spec.items():
            if name.endswith(".s"):  # scales of weights ~N(0, 0.02): max|w| / qmax
                t[name] = (torch.rand(shape, generator=gen) * 1e-2 + 1e-2).to(dtype)
            else:
                t[name] = torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8).view(dtype)
        layers.append({name: in_pages(v, pages) for name, v in t.items()})
    return layers


def expert_bytes(t: dict[str, torch.Tensor]) -> int:
    return sum(v[0].numel() * v.element_size() for v in t.values())


class Threads:
    """The kernels' thread count: moe_layer's (set_threads) and the --c-flags builds' own."""

    n = 1

    @classmethod
    def use(cls, n: int) -> None:
        cls.n = n
        set_threads(n)


def kernels(names: list[str], c_flags: list[str]) -> dict:
    """name -> layer(x, ids, weights, t, fmt)"""
    out = {name: lambda x, ids, w, t, fmt, name=name: moe_layer(x, ids, w, t, fmt, 0, len(t["w13.q"]), kernel=name)
           for name in names}
    for flags in c_flags:
        k = native.load(tuple(shlex.split(flags)))
        out[f"c {flags}"] = lambda x, ids, w, t, fmt, k=k: k(x, ids, w, t, int(fmt.kind[3:]), 0, len(t["w13.q"]), "silu",
                                                             Threads.n)
    return out


def check(layer, fmt: ExpertFormat, t, gen: torch.Generator, dtype: torch.dtype, reference=moe_reference) -> float:
    """Largest |kernel - reference| over the reference's largest magnitude, x in `dtype`, M = 1 and
    8; the reference is float32 on x's values."""
    worst = 0.0
    for m in (1, 8):
        x = torch.randn(m, HIDDEN, generator=gen).to(dtype)
        ids = torch.stack([torch.randperm(EXPERTS, generator=gen)[:TOP_K] for _ in range(m)])
        w = torch.rand(m, TOP_K, generator=gen)
        want = reference(x.float(), ids, w, t, fmt, 0, EXPERTS)
        worst = max(worst, float((layer(x, ids, w, t, fmt).float() - want).abs().max() / want.abs().max()))
    return worst


def call_seconds(layer, fmt: ExpertFormat, t, seconds: float, threads: int, gen: torch.Generator) -> float:
    """Seconds a call of one thread on expert 0 of `t`, in cache after the first call (in L2 when its
    weights fit there, else in L3)."""
    x = torch.randn(1, HIDDEN, generator=gen).to(torch.bfloat16)
    ids, w = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1)
    Threads.use(1)
    layer(x, ids, w, t, fmt)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        layer(x, ids, w, t, fmt)
        n += 1
    elapsed = time.perf_counter() - t0
    Threads.use(threads)
    return elapsed / n


def expert_weights(t) -> int:
    return t["w13.q"].shape[1] * 3 // 2 * HIDDEN


def bench(layer, fmt: ExpertFormat, layers, m: int, seconds: float, gen: torch.Generator) -> tuple[float, float]:
    """(GB/s of weights read, ms per layer call)"""
    per_expert = expert_bytes(layers[0])
    x = torch.randn(m, HIDDEN, generator=gen).to(torch.bfloat16)
    w = torch.rand(m, TOP_K, generator=gen)
    calls = [torch.stack([torch.randperm(EXPERTS, generator=gen)[:TOP_K] for _ in range(m)]) for _ in range(64)]
    layer(x, calls[0], w, layers[0], fmt)  # compile / load, and start the threads
    n, nbytes, elapsed = 0, 0, 0.0
    while elapsed < seconds:
        ids = calls[n % len(calls)]
        t = layers[n % len(layers)]
        t0 = time.perf_counter()
        layer(x, ids, w, t, fmt)
        elapsed += time.perf_counter() - t0
        nbytes += len(torch.unique(ids)) * per_expert
        n += 1
    return nbytes / elapsed / 1e9, elapsed / n * 1e3


def decode_rhythm(fmt: ExpertFormat, layers, gap_us: float, right: int | None, budget: int, seconds: float,
                  gen: torch.Generator) -> tuple[float, float, float, dict]:
    """(kernel ms, layer ms with the turn, GB/s of weights over the kernel's time, the kernel's own
    clock over the calls: native.CKernel.clock) at M = 1 with a turn of gap_us after each call;
    `right` None: no lookahead, else the guess names that many of the next call's experts."""
    c = native.load()
    bits = int(fmt.kind[3:])
    runs = [c.bind(t, bits, 0, EXPERTS, "silu", Threads.n) for t in layers]
    aheads = [c.bind_lookahead(t, bits, 0, EXPERTS, Threads.n) for t in layers]
    x, w, out = torch.randn(1, HIDDEN, generator=gen).to(torch.bfloat16), torch.rand(1, TOP_K), torch.empty(1, HIDDEN)
    words, seen = np.zeros(1, np.int64), np.zeros(1, np.int64)
    words[0] = seen.ctypes.data  # a word that never changes: the turn's time limit ends each lookahead
    calls = [torch.randperm(EXPERTS, generator=gen)[:TOP_K].view(1, TOP_K).to(torch.int32) for _ in range(64)]
    guesses = []  # made before timing: the guess for call i + 1, `right` of its experts and the rest wrong
    for i in range(len(calls)):
        nxt = calls[(i + 1) % len(calls)][0].tolist()
        wrong = [e for e in torch.randperm(EXPERTS, generator=gen).tolist() if e not in nxt]
        guesses.append(torch.tensor([nxt[: right or 0] + wrong[: TOP_K - (right or 0)]], dtype=torch.int32))
    per_expert = expert_bytes(layers[0])
    c.clock()
    n, kernel_s, t_start = 0, 0.0, time.perf_counter()
    while time.perf_counter() - t_start < seconds or n < 2 * len(layers):
        t0 = time.perf_counter()
        runs[n % len(runs)](x, calls[n % len(calls)], w, out)
        t1 = time.perf_counter()
        kernel_s += t1 - t0
        if right is not None:
            aheads[(n + 1) % len(aheads)](x, guesses[n % len(guesses)], words, seen, budget, gap_us * 1e-6)
        while time.perf_counter() - t1 < gap_us * 1e-6:
            pass
        n += 1
    total = time.perf_counter() - t_start
    return kernel_s / n * 1e3, total / n * 1e3, n * TOP_K * per_expert / kernel_s / 1e9, c.clock()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="threads (default: all cores)")
    ap.add_argument("--gb", type=float, default=2.2, help="GB of weights per format to rotate over (>= 2 keeps them out of cache)")
    ap.add_argument("--seconds", type=float, default=3.0, help="measured time per configuration")
    ap.add_argument("--c-flags", action="append", default=[], metavar="FLAGS",
                    help="also time a C build with these extra compiler flags (repeatable)")
    ap.add_argument("--group-size", type=int, default=128, help="quantization group (32: Q4_0's bytes per weight)")
    ap.add_argument("--formats", default="int4,int8", help="formats to time, in order")
    ap.add_argument("--gap-us", type=float, default=90.0, help="the GPU worker's turn between two layer calls (0: skip part 3)")
    ap.add_argument("--right", default="8,6,4", help="part 3's guesses: how many of the next call's top-k each names")
    ap.add_argument("--pin", action="store_true",
                    help="run on the first --threads cores only, as the pool process does (its cores are pinned, two kept "
                         "for the GPU worker and the coordinator: coordinator/processes.py:reserve_cores)")
    ap.add_argument("--kernels", default="c,numba", help="the pool's kernels to time (cpu_worker/expert_kernel.py)")
    ap.add_argument("--pages", choices=("small", "huge", "shared"), default="small",
                    help="the pages the weights and the DRAM read's buffer lie on (page_buffer says which is which)")
    ap.add_argument("--lookahead-kb", type=int, default=l2_bytes() >> 10, help="lookahead bytes per thread (default: one core's L2)")
    args = ap.parse_args()
    if args.pin:  # before any thread pool starts: its threads inherit the mask
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
    torch.set_num_threads(args.threads)
    Threads.use(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"threads {args.threads}, torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}", flush=True)
    path = native.build()
    print(f"C kernel: {path} ({' '.join(native.FLAGS)}), INT4 with bf16 x: {Q8_PATHS[native.CKernel(path).int4_q8]}", flush=True)
    layer_fns = kernels(args.kernels.split(","), args.c_flags)
    ceiling, huge = dram_read_gbs(max(args.gb, 2.0), args.pages)
    print(f"DRAM read (float32 sum over {max(args.gb, 2.0):.1f} GB, {args.pages} pages: {huge} on 2 MiB pages): "
          f"{ceiling:.1f} GB/s", flush=True)
    rows, rates, turns = [], [], []
    for kind in args.formats.split(","):
        fmt = ExpertFormat(kind, group_size=args.group_size)
        layers = make_layers(fmt, args.gb, gen, args.pages)
        total = len(layers) * EXPERTS * expert_bytes(layers[0]) / 1e9
        print(f"{kind}: {len(layers)} layers, {total:.2f} GB of expert weights ({huge_pages_mb()} on 2 MiB pages)", flush=True)
        torch.set_num_threads(1)  # as in the pool process: torch's idle OpenMP threads would spin against the kernel's
        for name, layer in layer_fns.items():
            for dtype, tol in ((torch.float32, TOLERANCE), (torch.bfloat16, TOLERANCE_BF16)):
                reference, ref_name = moe_reference, "reference"
                if name.startswith("c") and kind == "int4" and dtype == torch.bfloat16:
                    reference, ref_name, tol = moe_reference_q8, "Q8 reference", TOLERANCE_Q8
                err = check(layer, fmt, layers[0], gen, dtype, reference)
                x_name = str(dtype).removeprefix("torch.")
                print(f"  {name}: max error vs {ref_name} {err:.1e} of the output's magnitude ({x_name} x)", flush=True)
                if err > tol:
                    raise SystemExit(f"{name} disagrees with the reference on {kind}, {x_name} x ({err:.1e} > {tol:.0e})")
        # The arithmetic alone: a Qwen3-30B-A3B expert (2.6 MB at INT4/g32) stays in a core's L2 on
        # some machines and not on others (the lent Xeons' is 2 MB): read from L3 it measures that
        # path as much as the arithmetic. Two experts of SMALL_INTER rows (0.2 and 0.9 MB) stay in
        # L2, and the difference of their calls' times leaves out what a call costs whatever its
        # weights (its start, the input's preparation, the output's sum).
        small = [make_layers(fmt, 0, gen, "small", experts=1, inter=i, count=1)[0] for i in SMALL_INTER]
        for name, layer in layer_fns.items():
            sec = min(args.seconds, 1.0)
            rate = expert_weights(layers[0]) / call_seconds(layer, fmt, layers[0], sec, args.threads, gen) / 1e9
            a, b = (call_seconds(layer, fmt, t, sec, args.threads, gen) for t in small)
            l2_rate = (expert_weights(small[1]) - expert_weights(small[0])) / max(b - a, 1e-9) / 1e9
            rates.append((kind, name, rate, l2_rate))
            print(f"  {name}: {rate:.1f} G weights/s on 1 thread in cache, {l2_rate:.1f} in L2 (calls of "
                  f"{a * 1e6:.1f} / {b * 1e6:.1f} us on experts of {' / '.join(map(str, SMALL_INTER))} rows)", flush=True)
        for m in (1, 8):
            for name, layer in layer_fns.items():
                gbs, ms = bench(layer, fmt, layers, m, args.seconds, gen)
                rows.append((kind, m, name, ms, gbs, gbs / ceiling))
                print(f"  M={m} {name}: {ms:.3f} ms/layer, {gbs:.1f} GB/s, {gbs / ceiling:.0%} of DRAM read", flush=True)
        if args.gap_us > 0:
            floor_ms = TOP_K * expert_bytes(layers[0]) / ceiling / 1e6
            for right in [None, *map(int, args.right.split(","))]:
                k_ms, l_ms, gbs, clk = decode_rhythm(fmt, layers, args.gap_us, right,
                                                     (args.lookahead_kb << 10) * args.threads, args.seconds, gen)
                how = "no lookahead" if right is None else f"lookahead, guess {right}/{TOP_K} right"
                turns.append((kind, how, k_ms, l_ms, gbs, floor_ms / l_ms))
                per = max(1.0, clk["calls"])
                us = {k: 1e6 * v / per for k, v in clk.items() if k.endswith("_s") and not isinstance(v, list)}
                threads = [1e6 * t / per for t in clk["p1_by_thread_s"]] or [0.0]
                print(f"  M=1 + {args.gap_us:.0f} us turn, {how}: kernel {k_ms:.3f} ms ({gbs:.1f} GB/s), layer {l_ms:.3f} ms, "
                      f"{floor_ms / l_ms:.0%} of the floor; by its clock (us): threads in {us.get('wake_s', 0):.1f}, phase 1 "
                      f"done {us.get('p1_last_s', 0):.1f} (its threads {min(threads):.0f}-{max(threads):.0f}), phase 2 "
                      f"{us.get('p2_s', 0):.1f}", flush=True)
        del layers
        torch.set_num_threads(args.threads)
    print(f"\n| format | M | kernel | ms / layer | weights GB/s | fraction of {ceiling:.1f} GB/s |")
    print("|---|---|---|---|---|---|")
    for kind, m, name, ms, gbs, frac in rows:
        print(f"| {kind} | {m} | {name} | {ms:.3f} | {gbs:.1f} | {frac:.0%} |")
    if turns:
        print(f"\nDecode's rhythm: M = 1, each call followed by a {args.gap_us:.0f} us turn of the GPU worker; lookahead "
              f"{args.lookahead_kb} KiB a thread; floor = a layer's bytes at {ceiling:.1f} GB/s")
        print("| format | during the turn | kernel ms | kernel GB/s | layer ms (kernel + turn) | of the floor |")
        print("|---|---|---|---|---|---|")
        for kind, how, k_ms, l_ms, gbs, frac in turns:
            print(f"| {kind} | {how} | {k_ms:.3f} | {gbs:.1f} | {l_ms:.3f} | {frac:.0%} |")
    print(f"\nArithmetic alone (1 thread, weights in cache), and {args.threads} threads' worth against the ceiling:")
    print(f"| format | kernel | G weights/s, 1 thread | x {args.threads} threads, as GB/s of weights | / {ceiling:.1f} GB/s "
          f"| in L2: G weights/s, 1 thread | its x {args.threads} / {ceiling:.1f} GB/s |")
    print("|---|---|---|---|---|---|---|")
    for kind, name, rate, l2_rate in rates:
        per = args.threads * (0.5 if kind == "int4" else 1.0)
        print(f"| {kind} | {name} | {rate:.1f} | {rate * per:.0f} | {rate * per / ceiling:.1f}x | {l2_rate:.1f} "
              f"| {l2_rate * per / ceiling:.1f}x |")


if __name__ == "__main__":
    main()
