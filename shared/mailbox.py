"""The per-layer hop of decode between a GPU worker and a CPU pool process: a slot of shared memory
that both map, not a ZeroMQ message.

A decode step crosses this hop once per MoE layer. As ZeroMQ messages it cost ~2 ms per layer on
the lent H100 host, against a pool kernel of ~0.35 ms: a socket's I/O thread must find a core, and
the pool's cores are held by its kernel threads, which spin a while after every call. Here the GPU
worker writes the request straight into the slot (on CUDA a kernel does, into the page-locked,
mapped slot: gpu_worker/doorbell_kernel.py), a number written last says it is complete, and the pool
process, polling its slots while decode is under way, writes its reply beside it the same way (on
CUDA a kernel spins on the reply's number). ZeroMQ keeps the control messages (stats, shutdown).

One memfd holds a slot per (GPU worker, pool process) pair; the coordinator creates it and both
sides inherit it. A slot (MAILBOX_VERSION 3; every part 64-byte aligned):

    header   int64 [16]: 0 request number (written last by the GPU worker), 1 reply number (written
             last by the pool), 2 layer, 3 M, 4 dtype code of x (_DTYPES), 5 error length in bytes
             (0: none), 6 MAILBOX_VERSION (written by the coordinator), 7 1 once the pool process
             has filled its store segment (the GPU worker, started beside the pool, reads the store
             only after every one of its slots says so), 8 the request number a guess follows
             (written last by the GPU worker), 9 the layer the guess is for; 10-15 unused
    x        [max_m, hidden] in the GPU worker's dtype (room for float32)
    ids      int32 [max_m, top_k]: expert ids; ids the pool process does not hold are ignored (-1 too)
    weights  float32 [max_m, top_k]
    out      float32 [max_m, hidden]: the weighted sum over the experts this pool process holds
    error    ERROR_BYTES of UTF-8, when the pool failed the request
    guess    int32 [max_m, top_k]: the experts the GPU worker expects the next layer it sends this
             pool to choose (its router applied to this request's x, computed while the pool runs
             this one), which the pool reads ahead after answering (cpu_worker/lookahead.py); -1
             where none. Only a hint: a stale or torn guess reads the wrong bytes, never changes a
             result.

Ordering: each side writes its payload, then its number. x86 keeps stores in order, the GPU's kernel
fences (fence.sc.sys) before its number, and a reader loads the number before the payload, so a
changed number means a complete payload.
"""

from __future__ import annotations

import mmap
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

MAILBOX_VERSION = 3  # 2: header word 7 is the pool's filled flag; 3: the 16-word header and the guess
ERROR_BYTES = 1024
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
REQUEST, REPLY, LAYER, M, DTYPE, ERROR, VERSION, FILLED, GUESS, GUESS_LAYER = range(10)
HEADER_BYTES = 128


class PoolError(RuntimeError):
    """The pool failed a request, died, or does not answer."""


def dtype_code(dtype: torch.dtype) -> int:
    """How the header names x's dtype."""
    if dtype not in _DTYPES:
        raise PoolError(f"activations of dtype {dtype} cannot go to the CPU pool")
    return _DTYPES.index(dtype)


# Bytes every part of a slot is aligned to (slots themselves are whole pages): the doorbell
# kernels move 16 bytes a thread on that promise.
PART_ALIGN = 64


def _align(n: int) -> int:
    return (n + PART_ALIGN - 1) // PART_ALIGN * PART_ALIGN


@dataclass(frozen=True)
class SlotShape:
    max_m: int
    hidden: int
    top_k: int

    def parts(self) -> dict[str, tuple[int, int]]:
        """name -> (offset, bytes) within a slot."""
        sizes = {"header": HEADER_BYTES, "x": self.max_m * self.hidden * 4, "ids": self.max_m * self.top_k * 4,
                 "weights": self.max_m * self.top_k * 4, "out": self.max_m * self.hidden * 4, "error": ERROR_BYTES,
                 "guess": self.max_m * self.top_k * 4}
        out, at = {}, 0
        for name, n in sizes.items():
            out[name] = (at, n)
            at = _align(at + n)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of a slot, a whole number of pages."""
        at, n = self.parts()["guess"]
        return (at + n + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE

    def to_spec(self) -> dict:
        return {"max_m": self.max_m, "hidden": self.hidden, "top_k": self.top_k}


def create(shape: SlotShape, count: int) -> int:
    """Coordinator side: an inheritable memfd of `count` slots, each stamped with the version."""
    fd = os.memfd_create("krasis-mailboxes", 0)
    os.ftruncate(fd, max(1, count) * shape.nbytes)
    os.set_inheritable(fd, True)
    boxes = Mailboxes(fd, shape, count)
    for i in range(count):
        boxes.bytes[i * shape.nbytes : i * shape.nbytes + HEADER_BYTES].numpy().view(np.int64)[VERSION] = MAILBOX_VERSION
    boxes.close()
    return fd


class Mailboxes:
    """Every slot of the memfd `fd`, mapped."""

    def __init__(self, fd: int, shape: SlotShape, count: int):
        self.shape, self.count = shape, count
        self._map = mmap.mmap(fd, max(1, count) * shape.nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.bytes = torch.frombuffer(self._map, dtype=torch.uint8)

    def slot(self, i: int) -> "Slot":
        if not 0 <= i < self.count:
            raise ValueError(f"mailbox slot {i} of {self.count}")
        return Slot(self.bytes[i * self.shape.nbytes : (i + 1) * self.shape.nbytes], self.shape)

    def close(self) -> None:
        del self.bytes
        self._map.close()


class Slot:
    def __init__(self, raw: torch.Tensor, shape: SlotShape):
        self.shape = shape
        part = {name: raw[a : a + n] for name, (a, n) in shape.parts().items()}
        self.hdr = part["header"].numpy().view(np.int64)
        if self.hdr[VERSION] != MAILBOX_VERSION:
            raise PoolError(f"mailbox version {self.hdr[VERSION]}, this side speaks {MAILBOX_VERSION}")
        self.x = part["x"]  # bytes: a request's x is a view of them in its dtype (take())
        self.ids = part["ids"].view(torch.int32).view(shape.max_m, shape.top_k)
        self.weights = part["weights"].view(torch.float32).view(shape.max_m, shape.top_k)
        self.out = part["out"].view(torch.float32).view(shape.max_m, shape.hidden)
        self._error = part["error"].numpy()
        self.guess = part["guess"].view(torch.int32).view(shape.max_m, shape.top_k)
        self._views: dict[tuple[int, int], tuple] = {}  # (M, dtype code) -> take()'s views

    def _x_as(self, dtype: torch.dtype, m: int) -> torch.Tensor:
        n = m * self.shape.hidden
        return self.x.view(dtype)[:n].view(m, self.shape.hidden)

    # --- GPU worker side --------------------------------------------------------------------------

    def write(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """Copy a request's tensors in (checked by the caller: PoolClient); the header is publish()'s.
        On CUDA the GPU worker does this and publish() in a kernel (gpu_worker/doorbell_kernel.py)."""
        m = x.shape[0]
        self._x_as(x.dtype, m).copy_(x)
        self.ids[:m].copy_(ids)
        self.weights[:m].copy_(weights)

    def publish(self, layer: int, m: int, dtype: torch.dtype) -> int:
        """Hand the written request (layer `layer`, m rows of x in `dtype`) to the pool; returns its number."""
        self.hdr[LAYER], self.hdr[M], self.hdr[DTYPE] = layer, m, dtype_code(dtype)
        number = int(self.hdr[REQUEST]) + 1
        self.hdr[REQUEST] = number
        return number

    def post_guess(self, layer: int, ids: torch.Tensor) -> None:
        """After publish(): the experts ids [M, k] the next request, for `layer`, will probably choose
        (the guess part). On CUDA doorbell_kernel.guess does this."""
        m = ids.shape[0]
        self.guess[:m].copy_(ids)
        self.hdr[GUESS_LAYER] = layer
        self.hdr[GUESS] = self.hdr[REQUEST]

    def wait(self, number: int, alive, timeout_s: float = 600.0) -> torch.Tensor:
        """The reply to request `number`: float32 [M, hidden], a view of the slot (valid until the next
        write). `alive()` is asked now and then while waiting; False means the pool is gone."""
        hdr, spins, t0 = self.hdr, 0, None
        while hdr[REPLY] != number:
            spins += 1
            if spins % 65536 == 0:
                t0 = t0 or time.monotonic()
                if not alive():
                    raise PoolError("the CPU pool process exited")
                if time.monotonic() - t0 > timeout_s:
                    raise PoolError(f"the CPU pool did not answer in {timeout_s:.0f} s")
        if hdr[ERROR]:
            raise PoolError(self.error_text(int(hdr[ERROR])))
        return self.out[: hdr[M]]

    def wait_filled(self, alive, poll_s: float = 0.005) -> None:
        """Return once the pool process has filled its store segment; `alive()` as for wait()."""
        while not self.hdr[FILLED]:
            if not alive():
                raise PoolError("the CPU pool process exited before filling its store")
            time.sleep(poll_s)

    def error_text(self, n: int) -> str:
        """The pool's message for an error reply of n bytes."""
        return bytes(self._error[:n]).decode(errors="replace")

    # --- pool side --------------------------------------------------------------------------------

    def request(self) -> int:
        return int(self.hdr[REQUEST])

    def mark_filled(self) -> None:
        self.hdr[FILLED] = 1

    def take(self) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(layer, x, ids, weights, out) of the published request, as views of the slot: the pool
        writes its float32 reply into `out` and then calls answer(). The views are made once per
        (M, dtype): slicing tensors anew costs microseconds on every layer of every step."""
        m, code = int(self.hdr[M]), int(self.hdr[DTYPE])
        views = self._views.get((m, code))
        if views is None:
            views = self._views[(m, code)] = (self._x_as(_DTYPES[code], m), self.ids[:m], self.weights[:m], self.out[:m])
        return (int(self.hdr[LAYER]), *views)

    def answer(self, number: int, error: str | None = None) -> None:
        """Reply to request `number`: the `out` that take() gave has been written, or `error` says why not."""
        if error is None:
            self.hdr[ERROR] = 0
        else:
            data = error.encode()[:ERROR_BYTES]
            self._error[: len(data)] = np.frombuffer(data, dtype=np.uint8)
            self.hdr[ERROR] = len(data)
        self.hdr[REPLY] = number
