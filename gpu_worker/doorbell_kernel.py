"""The mailbox hop (shared/mailbox.py) driven by the GPU itself: a kernel rings the CPU pool's
doorbell and a kernel waits for its reply, so a decode step's layers need no host thread between
them and the whole step is one CUDA graph.

Why: with the host in the loop, each MoE layer of a decode step cost a stream sync (to know the
request's copies had landed), the header write, a spin on the reply, a copy back and a graph launch,
~0.5 ms per layer on the lent H100 host against ~0.15 ms of device work. Here the host enqueues the
whole step and runs ahead; the only waiting is the GPU's, on the pool.

The protocol is the slot's, unchanged for the pool process (Slot.publish and Slot.wait are the host
reference of these two kernels, and what CPU devices run):

    ring:  payload (x, ids as int32, weights as float32, layer, M, dtype code) stored into the
           mapped slot; barrier; fence.sc.sys; then the request number, so the pool that sees the
           number sees the payload (the number comes from a counter on the device, one per slot,
           which a graph's replay advances like an eager call);
    guess: after a ring, the experts the next layer the pool will be asked for probably chooses,
           its layer, barrier, fence, and the ring's request number (Slot.post_guess);
    wait:  spin on the reply number with volatile loads (sysmem, never a stale cached line) until it
           is the counter's, or until the GPU worker's host sets `abort` (the pool died or hung:
           PoolClient.finish); note an error reply's length in `failed`; then sum the slots' float32
           replies (and the device's own share of the experts, hcs_hybrid) into `out`, or add the
           sum to the layer's residual stream there.

Slots and `abort`, `failed` are page-locked host memory mapped into the device's address space
(cudaHostRegisterMapped, or torch's pinned allocator), passed as pointers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..shared import mailbox

_BLOCK = 2048
# Slots are whole pages of a page-aligned mapping and their parts PART_ALIGN-byte aligned
# (shared/mailbox.py): said so, the copies in and out of a slot move 16 bytes a thread, not one
# element (a slot's address comes from a table, which Triton otherwise takes as byte-aligned).
_SLOT_ALIGN = tl.constexpr(mailbox.PART_ALIGN)
# the header's fields (int64 indices), as constants the kernels may read
_REQUEST, _REPLY, _LAYER, _M, _DTYPE, _ERROR, _GUESS, _GUESS_LAYER = (
    tl.constexpr(getattr(mailbox, f)) for f in ("REQUEST", "REPLY", "LAYER", "M", "DTYPE", "ERROR", "GUESS", "GUESS_LAYER")
)


@triton.jit
def _fence_sys(n):
    # Orders this thread's earlier stores (and, after the barrier, its CTA's) before later ones as
    # every observer sees them, the host included: __threadfence_system(). The number passes through
    # so that the store of it depends on the fence.
    return tl.inline_asm_elementwise("fence.sc.sys;\n\tmov.b64 $0, $1;", "=l,l", [n], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit(do_not_specialize=["layer", "dtype_code"])
def _ring(base, offsets, counters, x_ptr, ids_ptr, w_ptr, layer, dtype_code,
          X_OFF: tl.constexpr, IDS_OFF: tl.constexpr, W_OFF: tl.constexpr,
          M: tl.constexpr, HIDDEN: tl.constexpr, TOPK: tl.constexpr, KB: tl.constexpr, BLOCK: tl.constexpr):
    s = tl.program_id(0)
    slot = base + tl.multiple_of(tl.load(offsets + s), _SLOT_ALIGN)
    xd = (slot + X_OFF).to(tl.pointer_type(x_ptr.dtype.element_ty))
    for i in range(0, M * HIDDEN, BLOCK):
        o = i + tl.arange(0, BLOCK)
        tl.store(xd + o, tl.load(x_ptr + o, mask=o < M * HIDDEN), mask=o < M * HIDDEN)
    k = tl.arange(0, KB)
    km = k < M * TOPK
    tl.store((slot + IDS_OFF).to(tl.pointer_type(tl.int32)) + k, tl.load(ids_ptr + k, mask=km).to(tl.int32), mask=km)
    tl.store((slot + W_OFF).to(tl.pointer_type(tl.float32)) + k, tl.load(w_ptr + k, mask=km).to(tl.float32), mask=km)
    hdr = slot.to(tl.pointer_type(tl.int64))
    tl.store(hdr + _LAYER, layer.to(tl.int64))
    tl.store(hdr + _M, tl.full((), M, tl.int64))
    tl.store(hdr + _DTYPE, dtype_code.to(tl.int64))
    n = tl.load(counters + s) + 1
    tl.store(counters + s, n)
    tl.debug_barrier()
    tl.store(hdr + _REQUEST, _fence_sys(n))


@triton.jit(do_not_specialize=["layer"])
def _guess(base, offsets, counters, ids_ptr, layer, GUESS_OFF: tl.constexpr, MK: tl.constexpr, KB: tl.constexpr):
    # the guess's ids, its layer, then (fenced) the number of the request it follows, which the ring
    # before it set: the pool takes a guess whose number is the request it just answered
    s = tl.program_id(0)
    slot = base + tl.multiple_of(tl.load(offsets + s), _SLOT_ALIGN)
    k = tl.arange(0, KB)
    tl.store((slot + GUESS_OFF).to(tl.pointer_type(tl.int32)) + k, tl.load(ids_ptr + k, mask=k < MK).to(tl.int32), mask=k < MK)
    hdr = slot.to(tl.pointer_type(tl.int64))
    tl.store(hdr + _GUESS_LAYER, layer.to(tl.int64))
    tl.debug_barrier()
    tl.store(hdr + _GUESS, _fence_sys(tl.load(counters + s)))


@triton.jit
def _wait(base, offsets, counters, abort, failed, out_ptr, res_ptr, extra_ptr,
          OUT_OFF: tl.constexpr, SLOTS: tl.constexpr, N: tl.constexpr, BLOCK: tl.constexpr, RESIDUAL: tl.constexpr,
          EXTRA: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.float32)
    for s in tl.static_range(SLOTS):
        slot = base + tl.multiple_of(tl.load(offsets + s), _SLOT_ALIGN)
        hdr = slot.to(tl.pointer_type(tl.int64))
        n = tl.load(counters + s)
        r = tl.load(hdr + _REPLY, volatile=True)
        a = tl.load(abort, volatile=True)
        while (r != n) & (a == 0):
            r = tl.load(hdr + _REPLY, volatile=True)
            a = tl.load(abort, volatile=True)
        err = tl.load(hdr + _ERROR, volatile=True)
        if err != 0:
            tl.store(failed + s, err)
        rep = (slot + OUT_OFF).to(tl.pointer_type(tl.float32))
        acc += tl.load(rep + o, mask=o < N, other=0.0, volatile=True)
    if EXTRA:
        acc = tl.load(extra_ptr + o, mask=o < N, other=0.0) + acc
    if RESIDUAL:
        # res + acc as torch adds them: the sum rounded to res's dtype, then added in float32 and rounded
        dt = res_ptr.dtype.element_ty
        res = tl.load(res_ptr + o, mask=o < N, other=0.0)
        tl.store(out_ptr + o, (res.to(tl.float32) + acc.to(dt).to(tl.float32)).to(dt), mask=o < N)
    else:
        tl.store(out_ptr + o, acc, mask=o < N)


class _Mapped:
    """A pointer into mapped host memory as Triton takes one (data_ptr and an element dtype); Triton's
    launcher turns it into the device address."""

    def __init__(self, ptr: int, dtype: torch.dtype):
        self.ptr, self.dtype = ptr, dtype

    def data_ptr(self) -> int:
        return self.ptr


def ring(base: int, offsets: torch.Tensor, counters: torch.Tensor, parts: dict[str, int], layer: int, dtype_code: int,
         x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> None:
    """Post x [M, H], ids and weights [M, k] to every slot at base + offsets (device int64)."""
    m, h = x.shape
    k = ids.shape[1]
    _ring[(offsets.numel(),)](
        _Mapped(base, torch.uint8), offsets, counters, x.contiguous(), ids.contiguous(), weights.contiguous(), layer,
        dtype_code, X_OFF=parts["x"], IDS_OFF=parts["ids"], W_OFF=parts["weights"], M=m, HIDDEN=h, TOPK=k,
        KB=triton.next_power_of_2(m * k), BLOCK=_BLOCK,
    )


def guess(base: int, offsets: torch.Tensor, counters: torch.Tensor, parts: dict[str, int], layer: int,
          ids: torch.Tensor) -> None:
    """After ring: post ids [M, k] (the experts layer `layer` will probably choose) to every slot."""
    mk = ids.numel()
    _guess[(offsets.numel(),)](_Mapped(base, torch.uint8), offsets, counters, ids.contiguous(), layer,
                               GUESS_OFF=parts["guess"], MK=mk, KB=triton.next_power_of_2(mk))


def wait(base: int, offsets: torch.Tensor, counters: torch.Tensor, abort: torch.Tensor, failed: torch.Tensor,
         parts: dict[str, int], m: int, hidden: int, residual: torch.Tensor | None = None,
         extra: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 [m, hidden] sum of every slot's reply to its last ring, plus `extra` (float32
    [m, hidden]: the experts the device ran meanwhile) when given; with `residual` [m, hidden],
    residual + that sum in residual's dtype (the decode layer's h + routed experts, one kernel
    instead of a wait, an add, a cast and an add)."""
    n = m * hidden
    if residual is not None:
        residual = residual.contiguous()
        out = torch.empty_like(residual)
    else:
        out = torch.empty(m, hidden, dtype=torch.float32, device=counters.device)
    _wait[(triton.cdiv(n, _BLOCK),)](
        _Mapped(base, torch.uint8), offsets, counters, abort, failed, out, out if residual is None else residual,
        out if extra is None else extra.contiguous(),
        OUT_OFF=parts["out"], SLOTS=offsets.numel(), N=n, BLOCK=_BLOCK, RESIDUAL=residual is not None,
        EXTRA=extra is not None,
    )
    return out
