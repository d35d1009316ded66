"""The host's DRAM shared between the CPU's threads and the GPU reading host memory over PCIe.

    python benchmarks/dram_share.py [--threads 14] [--gib 1] [--device cuda:0] [--json F]
    python benchmarks/dram_share.py --reader SECONDS     (the GPU reading host memory that long, as a
                                                           load beside another benchmark)

Why: a decode layer through the pool reads its chosen experts from DRAM with the pool's 14 threads,
at 106-113 GB/s on the lent H100 hosts, where a sum with every thread read up to 141 (BENCHMARKS.md,
session 35). The GPU can read the same store (page-locked and mapped, gpu_worker/dma.py) with its own
loads over PCIe, without a core. Whether a share of a layer's experts computed that way adds to the
pool's rate or takes from it depends on what the DRAM gives both at once, which this measures:

1. the CPU alone: a float32 sum over --gib GiB with --threads threads;
2. the GPU alone: a sum over host memory through a device view (its loads cross PCIe), and a
   copy-engine copy of the same bytes;
3. both at once, each one's rate over the same window;
4. decode's expert products (gpu_worker/expert_gemv_kernel.py: w13 then w2 of k experts for one
   token) on a Qwen3-30B-A3B layer (INT4/g32, 128 experts) in host memory, alone and while the CPU
   reads, against the same layer in device memory, each call on other experts (as a decode step),
   and copied from host memory into device memory first (the host share's way);
   then the GEMV's tilings on host memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from krasis.coordinator.bench import measure_dram
from krasis.gpu_worker.dma import mapped_view, pin_segment
from krasis.gpu_worker.expert_gemv_kernel import expert_gemv
from krasis.gpu_worker.host_share import gather
from krasis.shared.expert_store import ExpertFormat
from krasis.shared.quant import quantized

HIDDEN, INTER, EXPERTS = 2048, 768, 128


def host_buffer(nbytes: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(host float32 tensor of ones, page-locked and mapped; its device view)."""
    t = torch.ones(nbytes // 4)
    pin_segment(t, mapped=True)
    return t, mapped_view(t, device)


def gpu_rate(work, nbytes: int, reps: int = 5) -> float:
    """Bytes/s of `work` on the device, the fastest of reps."""
    work()
    best = float("inf")
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        work()
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) / 1e3)
    return nbytes / best


def together(work, work_bytes: int, calls: int, x: torch.Tensor) -> tuple[float, float]:
    """(device bytes/s, CPU bytes/s) with `calls` of `work` enqueued on the device and the CPU
    summing x until they are done: each rate over the window both ran."""
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(calls):
        work()
    b.record()
    t0, sums = time.perf_counter(), 0
    while not b.query():
        x.sum()
        sums += 1
    wall = time.perf_counter() - t0
    b.synchronize()
    return calls * work_bytes / (a.elapsed_time(b) / 1e3), sums * x.numel() * 4 / wall


def layer() -> tuple[ExpertFormat, dict]:
    """A Qwen3-30B-A3B layer's experts on the host (INT4/g32; one expert's random codes repeated:
    the work does not depend on the values)."""
    fmt = ExpertFormat("int4", torch.bfloat16, 32)
    t = {}
    for name, (o, i) in (("w13", (2 * INTER, HIDDEN)), ("w2", (HIDDEN, INTER))):
        one = quantized(fmt, torch.randn(o, i) * 0.05, name)
        t |= {n: v.unsqueeze(0).expand(EXPERTS, *v.shape).contiguous() for n, v in one.items()}
    return fmt, t


def products(fmt, t: dict, k: int, device, tiles=None, staged: bool = False):
    """(replay, bytes): a CUDA graph of 20 calls of the w13 and w2 products of one token's k
    experts, each call on other experts (none in the device's L2 from the call before), as a decode
    graph runs them (the host's launches not counted); the experts' bytes a replay reads. `staged`:
    each call copies its experts into device memory first and multiplies them there, as the host
    share does (gpu_worker/host_share.py: gather)."""
    perm = torch.randperm(EXPERTS)
    sets = [perm[(i * k) % (EXPERTS - k + 1):][:k].to(device) for i in range(20)]
    x = torch.randn(1, HIDDEN, device=device).bfloat16()
    a = torch.randn(k, INTER, device=device).bfloat16()
    stage = {n: torch.empty((k, *v.shape[1:]), dtype=v.dtype, device=device) for n, v in t.items()}
    every, count = torch.arange(EXPERTS, device=device), torch.tensor([k], dtype=torch.int32, device=device)
    mine = torch.arange(k, device=device)

    def calls():
        for r in sets:
            w, rows = t, r
            if staged:
                for n, v in t.items():
                    gather(v, stage[n], r, every, count)
                w, rows = stage, mine
            expert_gemv(fmt, w, "w13", rows, x, tiles, x_div=k, dtype=x.dtype), expert_gemv(fmt, w, "w2", rows, a, tiles, dtype=a.dtype)

    calls()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        calls()
    return graph.replay, 20 * k * sum(v[0].numel() * v.element_size() for v in t.values())


def reader(seconds: float, device, gib: float) -> None:
    """The device summing host memory for `seconds`; prints its rate."""
    nbytes = int(gib * 2**30)
    _, view = host_buffer(nbytes, device)
    view.sum()
    torch.cuda.synchronize()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        for _ in range(4):
            view.sum()
        torch.cuda.synchronize()
        n += 4
    print(f"reader: the device read host memory at {n * nbytes / (time.perf_counter() - t0) / 1e9:.1f} GB/s "
          f"for {time.perf_counter() - t0:.1f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=14, help="the CPU's threads (the pool's: 14 of the lent hosts' 16)")
    ap.add_argument("--gib", type=float, default=1.0, help="GiB each side reads per pass")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--reader", type=float, metavar="SECONDS", help="only read host memory from the device that long")
    ap.add_argument("--json", help="write the figures here too")
    a = ap.parse_args()
    device = torch.device(a.device)
    if a.reader:
        return reader(a.reader, device, a.gib)
    torch.set_num_threads(a.threads)
    nbytes = int(a.gib * 2**30)
    out: dict = {"threads": a.threads, "gib": a.gib, "device": torch.cuda.get_device_name(device)}
    x = torch.ones(nbytes // 4)
    host, view = host_buffer(nbytes, device)
    dev = torch.empty(nbytes // 4, device=device)
    out["cpu_alone_GBps"] = measure_dram(nbytes, reps=10) / 1e9
    torch.set_num_threads(os.cpu_count())
    out["cpu_every_core_GBps"] = measure_dram(nbytes, reps=10) / 1e9  # as bench's ceiling reads it
    torch.set_num_threads(a.threads)
    zero_copy = (lambda: view.sum(), nbytes)
    copy_engine = (lambda: dev.copy_(host, non_blocking=True), nbytes)
    out["gpu_zero_copy_alone_GBps"] = gpu_rate(*zero_copy) / 1e9
    out["gpu_copy_engine_alone_GBps"] = gpu_rate(*copy_engine) / 1e9
    print(f"alone: CPU {out['cpu_alone_GBps']:.1f} GB/s ({a.threads} threads; "
          f"{out['cpu_every_core_GBps']:.1f} with {os.cpu_count()}); device reading host memory "
          f"{out['gpu_zero_copy_alone_GBps']:.1f} (its loads), {out['gpu_copy_engine_alone_GBps']:.1f} (copy engine)",
          flush=True)
    for name, (work, size) in (("zero_copy", zero_copy), ("copy_engine", copy_engine)):
        calls = max(4, int(1.5 * out[f"gpu_{name}_alone_GBps"] * 1e9 / size))
        g, c = together(work, size, calls, x)
        out[f"together_{name}"] = {"gpu_GBps": g / 1e9, "cpu_GBps": c / 1e9, "sum_GBps": (g + c) / 1e9}
        print(f"together ({name}): device {g / 1e9:.1f} + CPU {c / 1e9:.1f} = {(g + c) / 1e9:.1f} GB/s", flush=True)
    fmt, t_host = layer()
    for v in t_host.values():
        pin_segment(v, mapped=True)
    t_mapped = {n: mapped_view(v, device) for n, v in t_host.items()}
    t_dev = {n: v.to(device) for n, v in t_host.items()}
    rows = []
    for k in (1, 2, 3, 4):
        for where, t, staged in (("device", t_dev, False), ("host", t_mapped, False), ("staged host", t_mapped, True)):
            replay, size = products(fmt, t, k, device, staged=staged)
            alone = gpu_rate(replay, size, reps=10)
            g, c = together(replay, size, max(10, int(1.5 * alone / size)), x)
            row = {"k": k, "where": where, "alone_us": 1e6 * size / alone / 20, "alone_GBps": alone / 1e9,
                   "with_cpu_us": 1e6 * size / g / 20, "cpu_meanwhile_GBps": c / 1e9}
            rows.append(row)
            print(f"k={k} experts in {where} memory: {row['alone_us']:.1f} us a call alone ({row['alone_GBps']:.1f} GB/s), "
                  f"{row['with_cpu_us']:.1f} us while the CPU reads at {row['cpu_meanwhile_GBps']:.1f} GB/s", flush=True)
    out["products"] = rows
    # the GEMV's tiling for host memory (its default tile read ~22 GB/s there on the lent H100, session
    # 36, where a plain sum read 49): fewer rows a program make more programs, more bytes a step more
    # reads in flight each
    tilings = {}
    for tiles in ((32, 128, 4), (8, 128, 4), (4, 128, 4), (8, 512, 4), (4, 1024, 4), (16, 256, 8), (2, 1024, 2)):
        replay, size = products(fmt, t_mapped, 2, device, tiles)
        rate = gpu_rate(replay, size, reps=10)
        tilings["_".join(map(str, tiles))] = {"us": 1e6 * size / rate / 20, "GBps": rate / 1e9}
        print(f"k=2 experts in host memory, tiles {tiles}: {1e6 * size / rate / 20:.1f} us a call ({rate / 1e9:.1f} GB/s)",
              flush=True)
    out["host_tilings"] = tilings
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
