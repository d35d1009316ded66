"""The GPU worker's side of decode: hand a layer's routed-expert work to every CPU pool process
(each holds a disjoint block of the experts) through its mailbox slot (shared/mailbox.py), and add
up their partial sums on the device."""

from __future__ import annotations

import os

import torch

from ..shared.mailbox import Mailboxes, PoolError, SlotShape
from .decode_graphs import eager

__all__ = ["PoolClient", "PoolError"]


class PoolClient:
    """`spec`: the GPU worker spec's "mailbox" entry: fd, shape, this worker's slot per pool
    process, and the pool processes' pids (to tell a dead pool from a slow one)."""

    def __init__(self, spec: dict, device: torch.device):
        self.device = device
        self.boxes = Mailboxes(spec["fd"], SlotShape(**spec["shape"]), spec["count"])
        self.slots = [self.boxes.slot(i) for i in spec["slots"]]
        self.pids = spec["pool_pids"]
        self._numbers: list[int] = []  # the requests submit() published, which collect() waits for
        self._m = 0
        shape = self.boxes.shape
        self._replies = [torch.empty(shape.max_m, shape.hidden, dtype=torch.float32, device=device) for _ in self.slots]
        self.pinned = device.type == "cuda"
        if self.pinned:
            from .dma import pin_segment

            pin_segment(self.boxes.bytes)  # the request and reply copies become DMA, no staging

    def _alive(self) -> bool:
        for pid in self.pids:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
        return True

    def submit(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """Post the work to every pool process and return at once (the caller may compute meanwhile):
        every slot's copies first (device work, part of a decode graph), then, eagerly, one wait
        for them and the requests published."""
        for slot in self.slots:
            slot.write(x, ids, weights)
        m, dtype = x.shape[0], x.dtype

        def publish(_):
            if self.pinned:
                torch.cuda.current_stream(self.device).synchronize()
            self._numbers, self._m = [slot.publish(layer, m, dtype) for slot in self.slots], m

        eager(publish)

    def collect(self) -> torch.Tensor:
        """The summed float32 [M, hidden] partials of the work `submit` posted, on the device."""

        def replies(_):
            # copied either way: a slot's reply is overwritten by its next request; into the same
            # device buffers at every call, which a decode graph then reads in place
            return [buf[: self._m].copy_(slot.wait(n, self._alive), non_blocking=self.pinned)
                    for buf, slot, n in zip(self._replies, self.slots, self._numbers)]

        parts = eager(replies)
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return total

    def close(self) -> None:
        if self.pinned:
            # a registered range must be unregistered before it is unmapped
            torch.cuda.synchronize(self.device)
            torch.cuda.cudart().cudaHostUnregister(self.boxes.bytes.data_ptr())
        self.boxes.close()
