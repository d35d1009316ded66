"""The GPU worker's side of decode: hand a layer's routed-expert work to every CPU pool process
(each holds a disjoint block of the experts) and add up their partial sums."""

from __future__ import annotations

import itertools

import torch
import zmq

from ..shared import protocol as P


class PoolError(RuntimeError):
    pass


class PoolClient:
    def __init__(self, ctx: zmq.Context, endpoints: list[str]):
        self.socks = []
        for ep in endpoints:
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(ep)
            self.socks.append(s)
        self._tags = itertools.count()

    def run(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.collect(self.submit(layer, x, ids, weights)).to(device=x.device, dtype=x.dtype)

    def submit(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> int:
        """Send the work to every pool process and return at once (the caller may compute meanwhile)."""
        tag = next(self._tags)
        msg = P.ExpertWork(layer=layer, tag=tag)
        msg.tensors = {"x": x.cpu(), "ids": ids.to(torch.int32).cpu(), "weights": weights.float().cpu()}
        frames = P.encode(msg)
        for s in self.socks:
            s.send_multipart(frames, copy=False)
        return tag

    def collect(self, tag: int) -> torch.Tensor:
        """The summed float32 [M, hidden] partials of the work `submit` sent (on the CPU)."""
        total = None
        for s in self.socks:
            reply = P.decode(s.recv_multipart(copy=False))
            if not isinstance(reply, P.ExpertResult) or reply.tag != tag:
                raise PoolError(f"unexpected reply from CPU pool: {type(reply).__name__}")
            if reply.error:
                raise PoolError(f"CPU pool: {reply.error}")
            out = reply.tensors["out"]
            total = out.float() if total is None else total + out.float()
        return total

    def close(self):
        for s in self.socks:
            s.close(0)
