"""The GPU worker's side of decode: hand a layer's routed-expert work to every CPU pool process
(each holds a disjoint block of the experts) through its mailbox slot (shared/mailbox.py), and add
up their partial sums on the device."""

from __future__ import annotations

import os

import torch

from ..shared.mailbox import Mailboxes, PoolError, SlotShape

__all__ = ["PoolClient", "PoolError"]


class PoolClient:
    """`spec`: the GPU worker spec's "mailbox" entry: fd, shape, this worker's slot per pool
    process, and the pool processes' pids (to tell a dead pool from a slow one)."""

    def __init__(self, spec: dict, device: torch.device):
        self.device = device
        self.boxes = Mailboxes(spec["fd"], SlotShape(**spec["shape"]), spec["count"])
        self.slots = [self.boxes.slot(i) for i in spec["slots"]]
        self.pids = spec["pool_pids"]
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

    def run(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.collect(self.submit(layer, x, ids, weights)).to(x.dtype)

    def submit(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> list[int]:
        """Post the work to every pool process and return at once (the caller may compute meanwhile):
        every slot's copies first, one wait for them, then the requests published."""
        for slot in self.slots:
            slot.write(layer, x, ids, weights)
        if self.pinned:
            torch.cuda.current_stream(self.device).synchronize()
        return [slot.publish() for slot in self.slots]

    def collect(self, numbers: list[int]) -> torch.Tensor:
        """The summed float32 [M, hidden] partials of the work `submit` posted, on the device."""
        total = None
        for slot, n in zip(self.slots, numbers):
            part = slot.wait(n, self._alive)
            # a copy either way: the slot's reply is overwritten by the next request
            part = part.to(self.device, non_blocking=self.pinned, copy=True)
            total = part if total is None else total.add_(part)
        return total

    def close(self) -> None:
        if self.pinned:
            # a registered range must be unregistered before it is unmapped
            torch.cuda.synchronize(self.device)
            torch.cuda.cudart().cudaHostUnregister(self.boxes.bytes.data_ptr())
        self.boxes.close()
