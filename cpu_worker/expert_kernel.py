"""The CPU pool's routed-expert kernel: one call per layer for a batch of M decode tokens.

    out[t] = sum_j w[t, j] * W2_e (silu(W_gate,e x_t) * W_up,e x_t),   e = ids[t, j] in this block

layer_kernel binds a layer's block of experts to the C kernel (expert_kernel.c, built for this CPU at
first use by native.py; moe_layer is the same work in one call for tests and benchmarks), which
also covers gpt-oss's clamped activation and expert biases; for INT4 experts and bf16 x (decode on
the GPU workers' dtype) it quantizes the activations to int8 per group and takes integer dot
products (shared/moe.py:moe_reference_q8 is that arithmetic's reference), float32 x keeping the
scheme's weight-only arithmetic. Where it cannot be built (no compiler, a CPU without AVX2) it warns
once and runs the numba kernel (expert_kernel_numba.py), which is also kept as the C kernel's second
opinion in tests and benchmarks. numba is imported only then: its import alone took ~0.3 s of every
pool process's start.
"""

from __future__ import annotations

import logging
import os
import subprocess

import torch

from ..shared.expert_store import ExpertFormat
from ..shared.moe import moe_reference
from . import native


_threads = len(os.sched_getaffinity(0))
_c_kernel: native.CKernel | None | bool = None  # None: not tried yet; False: could not be built


def c_kernel() -> native.CKernel | None:
    """The C kernel, built or loaded on first call; None (after one warning) where it cannot be."""
    global _c_kernel
    if _c_kernel is None:
        try:
            _c_kernel = native.load()
        except (native.BuildError, OSError, subprocess.SubprocessError) as e:
            logging.getLogger("krasis.cpu_worker").warning("C expert kernel unavailable, using the numba kernel: %s", e)
            _c_kernel = False
    return _c_kernel or None


def kernel_clock() -> dict:
    """The C kernel's clock since the last read (native.CKernel.clock), {} where it was never loaded."""
    return _c_kernel.clock() if _c_kernel else {}


def pin_threads(cpus: list[int]) -> bool:
    """Pin the C kernel's threads (set_threads's count), thread i to cpus[i], where it is loaded and
    there is a CPU for each (the pool process's cores); whether they were pinned. A host that refuses
    (a cpuset narrower than the mask) leaves them unpinned, with a warning: they run as before."""
    if not _c_kernel or len(cpus) != _threads:
        return False
    try:
        _c_kernel.pin(cpus)
    except OSError as e:
        logging.getLogger("krasis.cpu_worker").warning("kernel threads left unpinned: %s", e)
        return False
    return True


def layer_kernel(t: dict[str, torch.Tensor], fmt: ExpertFormat, first: int, count: int, act: str = "silu",
                 kernel: str = "auto"):
    """The routed-expert work of one block of a layer, bound once (the pool binds each layer's at
    start): run(x, ids, weights, out) writes the float32 partial sum [M, H] of x [M, H] over experts
    [first, first + count), whose tensors are `t`, into out, and returns how many (token, choice)
    pairs were the block's (the pool's share of the routing). `kernel`: "c", "numba", or "auto" (C if
    it could be built, else numba). What neither covers (dense stores, INT4 with odd groups; for
    numba also gptoss and biases) runs moe_reference."""
    reference = lambda x, ids, w: moe_reference(x, ids, w, t, fmt, first, count, act)  # noqa: E731
    if fmt.kind == "dense":
        return _into(reference, first, count)
    bits = {"int4": 4, "int8": 8}[fmt.kind]
    c = c_kernel() if kernel in ("auto", "c") else None
    if kernel == "c" and c is None:
        raise RuntimeError("the C expert kernel could not be built (see the warning above)")
    if c is not None:
        return c.bind(t, bits, first, count, act, _threads) or _into(reference, first, count)
    if act != "silu" or "b13" in t or not _even_int4_groups(fmt, t):
        return _into(reference, first, count)

    from . import expert_kernel_numba

    def numba_layer(x, ids, weights):
        return expert_kernel_numba.layer(x, ids, weights, t, bits, first, count, _threads)

    return _into(numba_layer, first, count)


def _into(fn, first: int, count: int):
    """layer_kernel's call for a path that returns its result as a new tensor."""
    def run(x, ids, weights, out):
        out.copy_(fn(x, ids, weights))
        return int(((ids >= first) & (ids < first + count)).sum())

    return run


def moe_layer(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    t: dict[str, torch.Tensor],
    fmt: ExpertFormat,
    first: int,
    count: int,
    act: str = "silu",
    kernel: str = "auto",
) -> torch.Tensor:
    """Same contract as shared/moe.py:moe_reference: x [M, H], ids [M, k], weights [M, k] -> the
    partial sum [M, H] in x's dtype (rounded once, from float32) over experts [first, first + count)
    whose tensors are `t`; layer_kernel's work in one call."""
    out = torch.empty(x.shape, dtype=torch.float32)
    layer_kernel(t, fmt, first, count, act, kernel)(x.contiguous(), ids, weights, out)
    return out.to(x.dtype)


def _even_int4_groups(fmt: ExpertFormat, t: dict[str, torch.Tensor]) -> bool:
    """The kernels read INT4 a whole byte (two weights) at a time, so a group must not end inside one
    (the C kernel checks this itself)."""
    if fmt.kind != "int4":
        return True
    return all(t[f"{n}.q"].shape[2] % t[f"{n}.s"].shape[2] == 0 for n in ("w13", "w2"))


def set_threads(n: int) -> None:
    """Threads of the kernels (the pool process's pinned cores)."""
    global _threads
    _threads = max(1, n)


def warm_up(run, hidden: int, first: int) -> None:
    """Compile what runs at first call (numba's kernel; the C kernel is built when bound) and fault
    in the scratch buffers before the first decode step waits on them: one token through a layer
    kernel's first expert."""
    run(torch.zeros(1, hidden), torch.tensor([[first]], dtype=torch.int32), torch.ones(1, 1),
        torch.empty(1, hidden))
