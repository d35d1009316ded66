"""The GPU worker's side of decode: hand a layer's routed-expert work to every CPU pool process
(each holds a disjoint block of the experts) through its mailbox slot (shared/mailbox.py), and add
up their partial sums on the device.

On CUDA the GPU does the hop itself (doorbell_kernel.py): the request and the wait are kernels, so
they run inside a decode graph and the host never waits per layer; `finish()` is then where the host
waits for the step, watching that the pool lives. On a CPU device the host does it (Slot.publish and
Slot.wait, the kernels' reference), as it computes the step anyway.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import torch

from ..shared.mailbox import Mailboxes, PoolError, SlotShape, dtype_code

__all__ = ["PoolClient", "PoolError"]

WAIT_TIMEOUT_S = 600.0  # a pool that answers nothing for this long is taken for hung


def wait_for(done, interrupt: Callable[[], bool] | None = None, watch: Callable[[], None] | None = None) -> bool:
    """Wait for the CUDA event `done` (None: nothing to wait for) with short naps; False as soon as
    `interrupt()` is true (the worker takes the next step's message and launches it behind this one
    before waiting on). `watch()` is called every 256 polls (it raises to give up)."""
    polls = 0
    while done is not None and not done.query():
        if interrupt is not None and interrupt():
            return False
        polls += 1
        if watch is not None and polls % 256 == 0:
            watch()
        time.sleep(20e-6)  # a step's end is ~0.1-20 ms away; leave the core (and the GIL)
    return True


class PoolClient:
    """`spec`: the GPU worker spec's "mailbox" entry: fd, shape, this worker's slot per pool
    process, and the pool processes' pids (to tell a dead pool from a slow one)."""

    def __init__(self, spec: dict, device: torch.device):
        self.device = device
        self.boxes = Mailboxes(spec["fd"], SlotShape(**spec["shape"]), spec["count"])
        self.slots = [self.boxes.slot(i) for i in spec["slots"]]
        self.pids = spec["pool_pids"]
        self.shape = self.boxes.shape
        self._parts = {name: at for name, (at, _) in self.shape.parts().items()}
        self.gpu = device.type == "cuda"
        self._numbers: list[int] = []  # host path: the requests submit() published
        self._m = 0
        if self.gpu:
            from .dma import pin_segment

            pin_segment(self.boxes.bytes, mapped=True)  # the kernels read and write the slots in place
            nbytes = self.shape.nbytes
            self._offsets = torch.tensor([i * nbytes for i in spec["slots"]], dtype=torch.int64, device=device)
            # the request numbers, advanced by the ring kernel: a graph's replay advances them too
            self._counters = torch.tensor([slot.request() for slot in self.slots], dtype=torch.int64, device=device)
            self._abort = torch.zeros(1, dtype=torch.int64).pin_memory()
            self._failed = torch.zeros(len(self.slots), dtype=torch.int64).pin_memory()

    def wait_filled(self) -> None:
        """Return once every pool process has filled its part of the store."""
        for slot in self.slots:
            slot.wait_filled(self._alive)

    def _alive(self) -> bool:
        for pid in self.pids:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
        return True

    def _check(self, x: torch.Tensor) -> int:
        """x's dtype code in the header, once x is known to fit a slot."""
        if x.shape[0] > self.shape.max_m:
            raise PoolError(f"{x.shape[0]} tokens in one decode step, the mailbox holds {self.shape.max_m} (--max-batch)")
        return dtype_code(x.dtype)

    def submit(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """Post the work to every pool process and return at once (the caller may compute meanwhile)."""
        code = self._check(x)
        self._m = x.shape[0]
        if self.gpu:
            from .doorbell_kernel import ring

            ring(self.boxes.bytes.data_ptr(), self._offsets, self._counters, self._parts, layer, code, x, ids, weights)
            return
        for slot in self.slots:
            slot.write(x, ids, weights)
        self._numbers = [slot.publish(layer, self._m, x.dtype) for slot in self.slots]

    def guess(self, layer: int, ids: torch.Tensor) -> None:
        """After submit: post ids [M, k], the experts the pool's next request (for `layer`) will
        probably choose, which it reads ahead of that request (shared/mailbox.py: the guess)."""
        if self.gpu:
            from .doorbell_kernel import guess

            guess(self.boxes.bytes.data_ptr(), self._offsets, self._counters, self._parts, layer, ids)
            return
        for slot in self.slots:
            slot.post_guess(layer, ids)

    def collect(self, residual: torch.Tensor | None = None, extra: torch.Tensor | None = None) -> torch.Tensor:
        """The summed float32 [M, hidden] partials of the work `submit` posted, on the device, plus
        `extra` (float32, the share the device computed meanwhile) when given; with `residual`,
        residual + that sum rounded to residual's dtype (as `residual + sum.to(dtype)`)."""
        if self.gpu:
            from .doorbell_kernel import wait

            return wait(self.boxes.bytes.data_ptr(), self._offsets, self._counters, self._abort, self._failed,
                        self._parts, self._m, self.shape.hidden, residual, extra)
        # copied: a slot's reply is overwritten by its next request
        parts = [slot.wait(n, self._alive).clone() for slot, n in zip(self.slots, self._numbers)]
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        if extra is not None:
            total = extra + total
        return total if residual is None else residual + total.to(residual.dtype)

    def finish(self, done=None, interrupt: Callable[[], bool] | None = None) -> bool:
        """After a step's work is enqueued: on CUDA, wait for it (the CUDA event `done`, recorded
        after it; None: all the work queued so far) while watching the pool; False, at once, when `interrupt()` says the host has
        something else to do first (wait_for). A dead pool, or one silent for WAIT_TIMEOUT_S,
        releases the waiting kernels (`abort`) and raises PoolError, as does an error reply to any
        request of the step."""
        if not self.gpu:
            return True
        if done is None:  # everything queued so far
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
        t0 = time.monotonic()

        def watch():
            why = None if self._alive() else "the CPU pool process exited"
            if why is None and time.monotonic() - t0 > WAIT_TIMEOUT_S:
                why = f"the CPU pool did not answer in {WAIT_TIMEOUT_S:.0f} s"
            if why is not None:
                self._abort[0] = 1
                done.synchronize()
                self._abort[0] = 0
                raise PoolError(why)

        if not wait_for(done, interrupt, watch):
            return False
        errors = [(slot, int(n)) for slot, n in zip(self.slots, self._failed.tolist()) if n]
        if errors:
            self._failed.zero_()
            slot, n = errors[0]
            raise PoolError(slot.error_text(n))
        return True

    def close(self) -> None:
        if self.gpu:
            # a registered range must be unregistered before it is unmapped
            torch.cuda.synchronize(self.device)
            torch.cuda.cudart().cudaHostUnregister(self.boxes.bytes.data_ptr())
        self.boxes.close()
