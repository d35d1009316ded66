"""Host time of a decode step's cache preparation (gpu_worker/kv_cache.py: KVCache.begin_step), by
batch size: every sequence's new row reserved in every K/V layer and the step's table of where the
rows are built, which the stage does before each decode step (graphed or not) while the device runs
the step before it; and of decoding the step's message (shared/protocol.py), which the worker does
first. Both must stay well under a step's device time to stay hidden.

    python benchmarks/decode_host.py [--layers 48] [--batches 1,8,32] [--heads 4] [--head-dim 128]

Runs on the CPU, building the table as on CUDA (the kernels are not launched): the figure is the
host's share, whatever the device. Qwen3-30B-A3B: 48 layers, 4 K/V heads of 128, fp8 cache.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from krasis.gpu_worker import cache_rows
from krasis.gpu_worker.kv_cache import KVCache
from krasis.shared import protocol as P
from krasis.shared.protocol import SeqSlice


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=100, help="cached tokens of each sequence before the steps")
    ap.add_argument("--steps", type=int, default=30)
    a = ap.parse_args()
    cache_rows.kernels_on = lambda device: True  # the table as on CUDA; nothing here launches a kernel
    print(f"{a.layers} layers, K/V [{a.heads}, {a.head_dim}] fp8, {a.steps} steps after a {a.prompt}-token prompt")
    print("| sequences | begin_step ms (median) | least | us per sequence and layer | Step message decode ms (median) |")
    print("|---|---|---|---|---|")
    for b in (int(x) for x in a.batches.split(",")):
        kv = KVCache(torch.device("cpu"), torch.bfloat16, a.prompt + a.steps + 1, "fp8")
        k = torch.randn(a.prompt, a.heads, a.head_dim)
        for layer in range(a.layers):
            for seq in range(b):
                kv.append(layer, SeqSlice(seq=seq, start=0, n=a.prompt), k, k)
        times = []
        for step in range(a.steps):
            slices = [SeqSlice(seq=seq, start=a.prompt + step, n=1) for seq in range(b)]
            t0 = time.perf_counter()
            kv.begin_step(slices)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        # a sampled decode step's message as the coordinator sends it (engine._send_decode)
        draw = P.Draw(temperature=1.0, top_p=0.9, u=0.5)
        msg = P.Step(step=1, slices=[SeqSlice(seq=seq, start=a.prompt, n=1, logits="sample", draw=draw) for seq in range(b)],
                     decode=True, tensors={"tokens": torch.full((b,), -1, dtype=torch.int64)})
        frames = P.encode(msg)
        dec = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            P.decode(frames)
            dec.append(time.perf_counter() - t0)
        print(f"| {b} | {med * 1e3:.2f} | {min(times) * 1e3:.2f} | {med * 1e6 / (b * a.layers):.1f} "
              f"| {statistics.median(dec) * 1e3:.2f} |")


if __name__ == "__main__":
    main()
