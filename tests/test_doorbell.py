"""The GPU's side of the mailbox hop (gpu_worker/doorbell_kernel.py through PoolClient) against a
pool played by a thread of this process that answers with the host protocol (Slot.request, take,
answer): requests arrive intact in every slot, replies are summed over the slots, eagerly and
replayed from a CUDA graph (the request numbers advance at every replay), an error reply and a dead
pool become PoolError from finish() without hanging the GPU, and the next step works after either.
Needs CUDA: runs on the lent GPU machine (benchmarks/device_check.py runs it), skipped elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

from krasis.gpu_worker.pool_client import PoolClient
from krasis.shared.mailbox import Mailboxes, PoolError, SlotShape, create

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the doorbell kernels need a GPU")

SHAPE = SlotShape(max_m=4, hidden=64, top_k=2)
SLOTS = 2


def _expected(layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What the fake pool's slots answer, summed: slot i returns x * (layer + 1) + sum(w * ids) + i."""
    one = x.float().cpu() * (layer + 1) + (w.float().cpu() * ids.float().cpu()).sum(1, keepdim=True)
    return sum(one + i for i in range(SLOTS))


class FakePool:
    def __init__(self, fd: int, fail_layer: int | None = None, silent: bool = False):
        self.boxes = Mailboxes(fd, SHAPE, SLOTS)
        self.slots = [self.boxes.slot(i) for i in range(SLOTS)]
        self.fail_layer, self.silent = fail_layer, silent
        self.stop = threading.Event()
        self.seen: list[tuple[int, int, torch.dtype]] = []
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        last = [s.request() for s in self.slots]
        while not self.stop.is_set():
            for i, slot in enumerate(self.slots):
                n = slot.request()
                if n == last[i]:
                    continue
                last[i] = n
                layer, x, ids, w, out = slot.take()
                self.seen.append((i, layer, x.dtype))
                if self.silent:
                    continue
                if layer == self.fail_layer:
                    slot.answer(n, error=f"RuntimeError: boom in layer {layer}")
                else:
                    out.copy_(x.float() * (layer + 1) + (w * ids.float()).sum(1, keepdim=True) + i)
                    slot.answer(n)

    def close(self):
        self.stop.set()
        self.thread.join()
        self.boxes.close()


def _client(fd: int, pids: list[int]) -> PoolClient:
    spec = {"fd": fd, "shape": SHAPE.to_spec(), "count": SLOTS, "slots": list(range(SLOTS)), "pool_pids": pids}
    return PoolClient(spec, torch.device("cuda"))


def _inputs(m: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, SHAPE.hidden, generator=g).bfloat16().cuda()
    ids = torch.randint(-1, 8, (m, SHAPE.top_k), generator=g).cuda()
    w = torch.rand(m, SHAPE.top_k, generator=g).cuda()
    return x, ids, w


def _two_layers(client: PoolClient, x, ids, w):
    client.submit(3, x, ids, w)
    y = client.collect()
    client.submit(4, y.bfloat16(), ids, w)
    return y, client.collect()


@pytest.mark.parametrize("m", [1, 3])
def test_eager_and_graphed_steps_reach_every_slot(m):
    fd = create(SHAPE, SLOTS)
    pool, client = FakePool(fd), _client(fd, [os.getpid()])
    try:
        x, ids, w = _inputs(m, 0)
        y, z = _two_layers(client, x, ids, w)
        client.finish()
        want_y = _expected(3, x, ids, w)
        torch.testing.assert_close(y.cpu(), want_y, rtol=0, atol=0)
        torch.testing.assert_close(z.cpu(), _expected(4, want_y.bfloat16(), ids, w), rtol=0, atol=0)
        assert sorted(pool.seen[:2]) == [(0, 3, torch.bfloat16), (1, 3, torch.bfloat16)]

        graph = torch.cuda.graph
        g = torch.cuda.CUDAGraph()
        with graph(g):
            gy, gz = _two_layers(client, x, ids, w)
        for seed in (1, 2, 3):
            nx, nids, nw = _inputs(m, seed)
            x.copy_(nx), ids.copy_(nids), w.copy_(nw)
            g.replay()
            client.finish()
            want_y = _expected(3, nx, nids, nw)
            torch.testing.assert_close(gy.cpu(), want_y, rtol=0, atol=0)
            torch.testing.assert_close(gz.cpu(), _expected(4, want_y.bfloat16(), nids, nw), rtol=0, atol=0)
    finally:
        client.close()
        pool.close()
        os.close(fd)


def test_a_guess_follows_its_request_in_every_slot():
    """guess() after submit(): each slot holds the ids (int32), the guess's layer, and, as its guess
    number, the request's own number (so the pool takes it as this request's), eagerly and replayed."""
    from krasis.shared.mailbox import GUESS, GUESS_LAYER

    fd = create(SHAPE, SLOTS)
    client = _client(fd, [os.getpid()])
    try:
        x, ids, w = _inputs(3, 4)
        guess = torch.randint(0, 8, (3, SHAPE.top_k)).cuda()

        def post():
            client.submit(5, x, ids, w)
            client.guess(7, guess)

        post()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            post()
        for replays in range(3):
            for slot in client.slots:
                assert slot.hdr[GUESS] == slot.request() == replays + 1 and slot.hdr[GUESS_LAYER] == 7
                assert torch.equal(slot.guess[:3], guess.cpu().int())
            guess.random_(0, 8)
            g.replay()
            torch.cuda.synchronize()
    finally:
        client.close()
        os.close(fd)


def test_wait_adds_the_residual_as_torch_does():
    """collect(residual=h) is h + collect().to(h.dtype), and collect(residual=h, extra=e) is
    h + (e + collect()).to(h.dtype), bit for bit (the decode layer's residual add and hcs_hybrid's
    GPU share, fused into the wait kernel)."""
    fd = create(SHAPE, SLOTS)
    pool, client = FakePool(fd), _client(fd, [os.getpid()])
    try:
        x, ids, w = _inputs(3, 5)
        g = torch.Generator().manual_seed(9)
        h = torch.randn(3, SHAPE.hidden, generator=g).bfloat16().cuda() * 7
        e = torch.randn(3, SHAPE.hidden, generator=g).cuda() * 3

        def step(**kw):
            client.submit(2, x, ids, w)
            return client.collect(**kw)

        fused, plain = step(residual=h), h + step().to(h.dtype)
        fused_e, plain_e = step(residual=h, extra=e), h + (e + step()).to(h.dtype)
        summed, plain_sum = step(extra=e), e + step()
        client.finish()
        assert fused.dtype == torch.bfloat16 and torch.equal(fused, plain)
        assert torch.equal(fused_e, plain_e) and not torch.equal(fused_e, fused)
        assert summed.dtype == torch.float32 and torch.equal(summed, plain_sum)
    finally:
        client.close()
        pool.close()
        os.close(fd)


def test_error_reply_raises_and_the_next_step_works():
    fd = create(SHAPE, SLOTS)
    pool, client = FakePool(fd, fail_layer=3), _client(fd, [os.getpid()])
    try:
        x, ids, w = _inputs(2, 0)
        _two_layers(client, x, ids, w)
        with pytest.raises(PoolError, match="boom in layer 3"):
            client.finish()
        client.submit(5, x, ids, w)
        out = client.collect()
        client.finish()
        torch.testing.assert_close(out.cpu(), _expected(5, x, ids, w), rtol=0, atol=0)
    finally:
        client.close()
        pool.close()
        os.close(fd)


def test_a_dead_pool_releases_the_gpu():
    """The pool takes requests but never answers, and its pid is gone: finish() raises instead of
    waiting forever, and the kernels spinning on the reply are released."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    fd = create(SHAPE, SLOTS)
    pool, client = FakePool(fd, silent=True), _client(fd, [dead.pid])
    try:
        x, ids, w = _inputs(1, 0)
        _two_layers(client, x, ids, w)
        with pytest.raises(PoolError, match="exited"):
            client.finish()
        torch.cuda.synchronize()  # nothing left spinning
    finally:
        client.close()
        pool.close()
        os.close(fd)
