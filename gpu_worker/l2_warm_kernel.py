"""Reading the next layer's weights into the device's L2 cache while the CPU pool runs this one.

Why: in a decode step through the pool the device idles for the pool's kernel (~280 us a layer on
the lent H100 hosts), then runs the next layer's turn (~45 us of kernels) while the pool idles, and
the two add up. The turn's two attention products read their weights cold from HBM: qkv 9.0-9.3 us
and o 7.7-7.9 for Qwen3-30B-A3B's 38 MB of bf16 at one token, where the same qkv product took 5.3 us
with its weight already in the 50 MB L2 (BENCHMARKS.md, sessions 25 and 28). Read during the pool's
kernel, the next turn's weights wait in L2 and the turn shortens by what the products spent
waiting on HBM; the read itself costs device time nobody was using. Measured on an H100 host with
every layer through the pool: the pool's wait between layers ~3 us shorter (51.5-53.2 against
55.0-56.3 us, BENCHMARKS.md session 35), less than the products' cold and warm times promised.

`warm` reads every 32-bit word of a table of tensors once, with the evict_last policy (later reads
of other data evict these lines last), each program a strided share, and stores the XOR of what it
read per program: the loads then have a use, and the XOR of the sink is the XOR of every word read,
in any order (warm_reference is the plain one), which tells a test that every byte was read once.

CUDA graphs: the table, the sink and the launch are fixed at construction; nothing syncs.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

# Tensors start 16-byte aligned (torch's allocations are), so a program's loads move 16 bytes a thread.
_ALIGN = tl.constexpr(16)
# 16 KiB a program a step: few steps for a layer's ~40 MB, each program's loads all in flight.
_BLOCK = 4096
# Programs per SM: enough loads in flight to read at the HBM's rate.
_PER_SM = 2
# The share of the device's L2 a layer's warmed weights may take: the turn's own reads and writes
# (the KV cache, activations, the mailbox's copies) need the rest, and a line one L2 partition
# holds for SMs of the other may be held twice (Qwen3-30B-A3B's 38 MB of bf16 attention and router
# weights against an H100's 50 MiB).
L2_SHARE = 0.75


@triton.jit
def _warm(base, table, n, sink, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    acc = tl.zeros((BLOCK,), tl.int32)
    for i in range(n):
        words = (base + tl.multiple_of(tl.load(table + 2 * i), _ALIGN)).to(tl.pointer_type(tl.int32))
        count = tl.load(table + 2 * i + 1)
        for start in range(pid * BLOCK, count, step):
            o = start + tl.arange(0, BLOCK)
            acc ^= tl.load(words + o, mask=o < count, other=0, eviction_policy="evict_last")
    tl.store(sink + pid, tl.xor_sum(acc, 0))


def on(t: torch.Tensor, device: torch.device) -> bool:
    """Whether t lies on device ("cuda" meaning the current CUDA device)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return t.device == device


class L2Warm:
    """One launch that reads `tensors` (those of them on `device`, contiguous and 16-byte aligned, in
    order while they fit in `budget` bytes) into L2. On the CPU it runs under Triton's interpreter
    (the tests)."""

    def __init__(self, tensors: list[torch.Tensor], device: torch.device, budget: int, programs: int | None = None):
        fit, words, total = [], [], 0
        for t in tensors:
            nbytes = t.numel() * t.element_size()
            if (on(t, device) and t.is_contiguous() and t.data_ptr() % 16 == 0 and nbytes >= 4
                    and total + nbytes <= budget):
                fit.append(t)
                words.append(nbytes // 4)
                total += nbytes
        self.tensors, self.nbytes = fit, total
        if not fit:
            return
        if programs is None:
            programs = _PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
        start = min(t.data_ptr() for t in fit)
        self.base = next(t for t in fit if t.data_ptr() == start).view(-1).view(torch.uint8)
        self.table = torch.tensor([[t.data_ptr() - start, n] for t, n in zip(fit, words)], dtype=torch.int64, device=device)
        self.sink = torch.zeros(programs, dtype=torch.int32, device=device)

    def __call__(self) -> None:
        if self.tensors:
            _warm[(self.sink.numel(),)](self.base, self.table, len(self.tensors), self.sink, BLOCK=_BLOCK)

    def checksum(self) -> int:
        """The XOR of the last launch's reads."""
        return int(np.bitwise_xor.reduce(self.sink.cpu().numpy()))


def warm_reference(tensors: list[torch.Tensor]) -> int:
    """The XOR of every whole 32-bit word of `tensors`: what L2Warm.checksum gives after a launch."""
    acc = np.int32(0)
    for t in tensors:
        b = t.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy()
        acc ^= np.bitwise_xor.reduce(b[: b.size // 4 * 4].view(np.int32))
    return int(acc)
