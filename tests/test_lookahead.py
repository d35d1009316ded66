"""The CPU pool's lookahead (cpu_worker/lookahead.py, expert_kernel.c: krasis_lookahead): its guess
is the top-k of the next layer's router on this layer's input, it reads exactly the bytes of the
guessed experts of its block (no more than its budget), it stops as soon as a request arrives, and
a pool running it answers what it answers without it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil

import numpy as np
import pytest
import torch

import tiny_models as tm
from krasis.coordinator.engine import Engine
from krasis.coordinator.bench import generate_together
from krasis.coordinator.processes import RuntimeOptions
from krasis.cpu_worker import native
from krasis.cpu_worker.lookahead import QUIET, l2_bytes
from krasis.shared import mailbox
from krasis.shared.expert_store import ExpertFormat
from krasis.shared.models.family import ExpertShape
from krasis.shared.weights import load_family

HAVE_CC = any(shutil.which(n) for n in ([os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc"]))
pytestmark = pytest.mark.skipif(not HAVE_CC, reason="no C compiler")

HIDDEN, INTER, EXPERTS, TOP_K = 256, 128, 16, 4
FIRST, COUNT = 4, 8  # this block holds experts [4, 12) of 16


def block(fmt: ExpertFormat, gen: torch.Generator, count: int = COUNT) -> dict[str, torch.Tensor]:
    """`count` experts in the store layout: random codes, scales ~1e-2 (the lookahead only reads
    bytes, but the decode loop's answers are compared)."""
    spec = fmt.tensors(ExpertShape(EXPERTS, TOP_K, HIDDEN, INTER), count)
    return {n: (torch.rand(shape, generator=gen) * 1e-2 + 1e-2).to(dtype) if n.endswith(".s")
            else torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).view(dtype) for n, (dtype, shape) in spec.items()}


def expert_bytes(t: dict[str, torch.Tensor]) -> int:
    return sum(v[0].numel() * v.element_size() for v in t.values())


def never_stop():
    """A request word that never changes, and its value."""
    seen = np.zeros(1, np.int64)
    words = np.array([seen.ctypes.data], np.int64)
    return words, seen


@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("m, threads, xdtype", [(1, 1, torch.bfloat16), (3, 2, torch.float32), (5, 3, torch.bfloat16)])
@pytest.mark.parametrize("bias", [False, True])
def test_guess_is_the_routers_top_k_and_reads_the_guessed_experts_bytes(kind, m, threads, xdtype, bias):
    gen = torch.Generator().manual_seed(m * 7 + threads + bias)
    t = block(ExpertFormat(kind, group_size=32), gen)
    router = torch.randn(EXPERTS, HIDDEN, generator=gen).to(torch.bfloat16)
    b = torch.randn(EXPERTS, generator=gen) if bias else None
    x = torch.randn(m, HIDDEN, generator=gen).to(xdtype)
    ahead = native.load().bind_lookahead(t, int(kind[3:]), FIRST, COUNT, threads, router, b)
    guess = torch.full((m, TOP_K), -1, dtype=torch.int32)
    words, seen = never_stop()
    read = ahead(x, guess, words, seen, budget=1 << 30)

    logits = x.float() @ router.float().T + (0 if b is None else b)
    want = logits.topk(TOP_K, dim=-1).indices
    assert [sorted(r) for r in guess.tolist()] == [sorted(r) for r in want.tolist()]
    in_block = {e for e in want.flatten().tolist() if FIRST <= e < FIRST + COUNT}
    assert read == len(in_block) * expert_bytes(t)  # every byte of each guessed expert of the block, once


def test_clock_counts_the_lookaheads_guess():
    """krasis_clock's lookahead entries: one a call that ran, its threads in before its guess made."""
    gen = torch.Generator().manual_seed(3)
    t = block(ExpertFormat("int4", group_size=32), gen)
    c = native.load()
    ahead = c.bind_lookahead(t, 4, FIRST, COUNT, 2, torch.randn(EXPERTS, HIDDEN, generator=gen).to(torch.bfloat16))
    c.clock()
    words, seen = never_stop()
    for _ in range(3):
        ahead(torch.randn(1, HIDDEN, generator=gen), torch.empty(1, TOP_K, dtype=torch.int32), words, seen, budget=1 << 20)
    clk = c.clock()
    assert clk["ahead_calls"] == 3 and clk["calls"] == 0
    assert 0 <= clk["ahead_wake_s"] <= clk["ahead_guess_s"]


def test_given_guess_budget_and_stop():
    gen = torch.Generator().manual_seed(1)
    t = block(ExpertFormat("int4", group_size=32), gen)
    ahead = native.load().bind_lookahead(t, 4, FIRST, COUNT, 2)
    x = torch.randn(2, HIDDEN, generator=gen)
    guess = torch.tensor([[4, 5, 0, 15], [5, 11, 12, 3]], dtype=torch.int32)  # 4, 5 and 11 are the block's
    words, seen = never_stop()
    assert ahead(x, guess.clone(), words, seen, budget=1 << 30) == 3 * expert_bytes(t)
    assert ahead(x, guess.clone(), words, seen, budget=1 << 30, max_s=1e-9) < 3 * expert_bytes(t)
    # each of the 2 threads stops at its half of the budget, within one 4 KiB piece
    budget = 40_000
    assert budget <= ahead(x, guess.clone(), words, seen, budget=budget) <= budget + 2 * 4096
    # experts ruled out (hcs_hybrid's hot ones) are not read though guessed
    allowed = np.ones(EXPERTS, np.uint8)
    allowed[5] = 0
    assert ahead(x, guess.clone(), words, seen, budget=1 << 30, allowed=allowed) == 2 * expert_bytes(t)
    # a request has arrived: nothing is read
    changed = np.ones(1, np.int64)
    assert ahead(x, guess.clone(), np.array([changed.ctypes.data], np.int64), seen, budget=1 << 30) == 0
    # with a router too, and no guess is made: the buffer says none (-1), not what it held before
    with_router = native.load().bind_lookahead(t, 4, FIRST, COUNT, 2, torch.randn(EXPERTS, HIDDEN, generator=gen).bfloat16())
    stale = guess.clone()
    assert with_router(x, stale, np.array([changed.ctypes.data], np.int64), seen, budget=1 << 30) == 0
    assert (stale == -1).all()
    assert with_router(x, stale, words, seen, budget=1 << 30) > 0 and (stale >= 0).all()


def test_hold_lasts_until_a_request_or_its_time():
    """krasis_hold keeps the threads running until a request number differs from the one seen (a
    thread writes it 20 ms in) or its time is up."""
    import threading
    import time

    words, seen = never_stop()
    box = np.zeros(1, np.int64)
    words[0] = box.ctypes.data
    hold = native.load().bind_hold(words, seen, 2)
    t0 = time.perf_counter()
    assert not hold(0.03) and time.perf_counter() - t0 >= 0.03
    timer = threading.Timer(0.02, lambda: box.__setitem__(0, 1))
    timer.start()
    t0 = time.perf_counter()
    assert hold(5.0)
    assert 0.015 <= time.perf_counter() - t0 < 4.0
    timer.join()
    t0 = time.perf_counter()
    assert hold(5.0) and time.perf_counter() - t0 < 1.0  # the word differs already: at once


class Pool:
    """The decode loop (decode_loop.c) on `slots` mailbox slots and `layers` layers of one block of
    all EXPERTS experts, with a router per layer after the first; requests are published as a GPU
    worker would, and `serve()` runs the loop until it is idle."""

    def __init__(self, gen, layers=2, slots=1, routers=None, budget=1 << 30, threads=2):
        from krasis.cpu_worker.decode_loop import DecodeLoop

        self.fmt = ExpertFormat("int4", group_size=32)
        self.t = block(self.fmt, gen, EXPERTS)
        shape = mailbox.SlotShape(2, HIDDEN, TOP_K)
        boxes = mailbox.Mailboxes(mailbox.create(shape, slots), shape, slots)
        self.slots = [boxes.slot(i) for i in range(slots)]
        self.c = native.load()
        run = self.c.bind(self.t, 4, 0, EXPERTS, "silu", threads)
        routers = routers or {layer: (torch.randn(EXPERTS, HIDDEN, generator=gen), None) for layer in range(1, layers)}
        self.loop = DecodeLoop(self.c, self.slots, {layer: run for layer in range(layers)}, routers,
                               {layer: EXPERTS for layer in range(layers)}, {i: i + 1 for i in range(layers - 1)}, budget)

    def publish(self, layer, ids, x=None, slot=0, dtype=torch.bfloat16):
        ids = torch.tensor(ids, dtype=torch.int32).view(1, -1)
        x = torch.ones(1, HIDDEN, dtype=dtype) if x is None else x.to(dtype)
        self.slots[slot].write(x, ids, torch.full(ids.shape, 0.25))
        return self.slots[slot].publish(layer, 1, dtype)

    def serve(self):
        return self.loop.run(0.0, 10.0)

    def stats(self):
        return self.loop.stats()


def test_the_loop_answers_what_the_kernel_computes_and_returns_what_it_does_not_serve():
    """Each request is answered in its slot with the layer kernel's own result and counted; a layer
    with no block here, or x in fp16, is returned to the caller untaken and unanswered."""
    gen = torch.Generator().manual_seed(11)
    pool = Pool(gen, layers=2)
    x = torch.randn(1, HIDDEN, generator=gen)
    number = pool.publish(0, [1, 3, 5, 7], x, dtype=torch.float32)
    assert pool.serve() == -1
    slot = pool.slots[0]
    assert slot.hdr[mailbox.REPLY] == number and slot.hdr[mailbox.ERROR] == 0
    want = pool.c(x, torch.tensor([[1, 3, 5, 7]]), torch.full((1, TOP_K), 0.25), pool.t, 4, 0, EXPERTS, "silu", 2)
    assert want.abs().max() > 0 and torch.equal(slot.out[:1], want)
    st = pool.stats()
    assert st["calls"] == 1 and st["tokens"] == 1 and st["pairs"] == TOP_K and st["max_m"] == 1
    assert 0 < st["kernel_s"] <= st["serve_s"]
    pool.publish(5, [0, 1, 2, 3])  # no such layer here
    assert pool.serve() == 0 and pool.loop.seen[0] == number and slot.hdr[mailbox.REPLY] == number
    pool.loop.seen[0] = slot.request()  # taken by the caller
    pool.publish(0, [0, 1, 2, 3], dtype=torch.float16)
    assert pool.serve() == 0 and pool.stats()["calls"] == 1


def test_experts_never_asked_for_are_left_out_after_quiet_requests():
    """hcs_hybrid masks its hot experts out of the pool's requests; once a layer has had QUIET requests,
    the experts none of them asked for are left out of its reads, and one asked for again comes back.
    Layer 1's router always guesses experts 4-7; its requests ask for 0-3 only."""
    gen = torch.Generator().manual_seed(12)
    router = -torch.ones(EXPERTS, HIDDEN)
    router[4:8] = 1.0
    pool = Pool(gen, layers=2, routers={1: (router, None)})
    expert = expert_bytes(pool.t)
    read = []
    for _ in range(QUIET + 1):
        before = pool.stats()["lookahead_bytes"]
        pool.publish(0, [8, 9, 10, 11])
        pool.serve()  # layer 0, then its lookahead for layer 1
        read.append(pool.stats()["lookahead_bytes"] - before)
        pool.publish(1, [0, 1, 2, 3])
        pool.serve()
    assert read[0] == 4 * expert and read[QUIET - 1] == 4 * expert  # too few requests of layer 1 to tell
    assert read[QUIET] == 0  # 4-7 unasked for QUIET requests: taken as hot
    pool.publish(1, [7, 1, 2, 3])  # the hot set changed: 7 is asked for
    pool.serve()
    before = pool.stats()["lookahead_bytes"]
    pool.publish(0, [8, 9, 10, 11])
    pool.serve()
    assert pool.stats()["lookahead_bytes"] - before == expert


def test_a_lookahead_that_reads_nothing_is_skipped_for_a_while():
    """EMPTY lookaheads in a row from a layer that read nothing (here the next request is always in
    before its guess: slot 1's) turn that layer's lookahead off for its next SKIP requests, the
    threads held instead (no time: a request is in), then it is tried again; another layer's, which
    reads, goes on; the skipped requests still count for the hot-expert mask."""
    from krasis.cpu_worker.lookahead import EMPTY, SKIP

    gen = torch.Generator().manual_seed(13)
    pool = Pool(gen, layers=3, slots=2)
    for _ in range(EMPTY + SKIP):
        pool.publish(0, [0, 1, 2, 3], slot=0)
        pool.publish(1, [0, 1, 2, 3], slot=1)
        pool.serve()  # slot 0's layer 0 (its lookahead sees slot 1's request), then slot 1's layer 1
    st = pool.stats()
    assert st["calls"] == 2 * (EMPTY + SKIP)
    assert st["lookahead_skipped"] == SKIP and st["lookahead_calls"] == EMPTY + (EMPTY + SKIP)
    assert pool.loop.asked[0] == EMPTY + SKIP
    pool.publish(0, [0, 1, 2, 3])
    pool.serve()
    assert pool.stats()["lookahead_calls"] == st["lookahead_calls"] + 1  # tried again


def test_a_skipped_lookahead_holds_the_threads_until_the_next_request():
    """Where a layer's lookahead is skipped, the loop holds the kernel's threads (krasis_hold) for
    HOLD_S unless the next request is in already."""
    import time

    from krasis.cpu_worker.lookahead import HOLD_S

    gen = torch.Generator().manual_seed(14)
    pool = Pool(gen, layers=2)
    pool.loop.skip[0] = 2
    pool.publish(0, [0, 1, 2, 3])
    t0 = time.perf_counter()
    pool.serve()  # nothing comes: held HOLD_S
    assert time.perf_counter() - t0 >= HOLD_S and pool.stats()["lookahead_skipped"] == 1


def test_looks_ahead_at_the_layer_that_comes_next_to_the_pool():
    """With layer 1 decoded on the GPU (resident), the pool is asked for 0, 2, 3: once a step has shown
    it, a request for layer 0 reads ahead for layer 2 (and the guess is scored there), not for 1."""
    gen = torch.Generator().manual_seed(15)
    pool = Pool(gen, layers=4, slots=2)
    for layer in (0, 2, 3):  # first step: the store's next layer
        pool.publish(layer, [0, 1, 2, 3])
        pool.serve()
    assert pool.loop.next[0] == 2 and pool.loop.next[2] == 3
    assert pool.stats()["chosen"] == TOP_K  # layer 3's request scored the guess made after layer 2
    pool.publish(0, [0, 1, 2, 3])
    pool.serve()
    assert pool.loop.pending == 2  # from then on: the layer that followed it
    # a second slot's requests (another stage) do not teach this slot's order
    pool.publish(3, [0, 1, 2, 3], slot=1)
    pool.serve()
    pool.publish(0, [0, 1, 2, 3])
    pool.serve()
    assert pool.loop.next[0] == 2 and pool.loop.pending == 2


def test_a_guess_posted_after_the_request_is_read_ahead_instead_of_the_pools_own():
    """The GPU worker's guess (shared/mailbox.py: posted after the request it follows, for the layer
    it will send next) is what the lookahead reads and scores, for that layer; a guess posted after
    an earlier request is stale and the pool guesses itself, for the layer it learned comes next."""
    gen = torch.Generator().manual_seed(16)
    router = -torch.ones(EXPERTS, HIDDEN)
    router[4:8] = 1.0  # the pool's own guess for layers 1 and 2 (the next ones): experts 4-7
    pool = Pool(gen, layers=3, routers={1: (router, None), 2: (router, None)})
    expert = expert_bytes(pool.t)
    slot = pool.slots[0]
    pool.publish(0, [0, 1, 2, 3])
    slot.post_guess(2, torch.tensor([[8, 9, 10, 4]], dtype=torch.int32))
    pool.serve()
    st = pool.stats()
    assert st["posted"] == 1 and pool.loop.pending == 2 and st["lookahead_bytes"] == 4 * expert
    pool.publish(2, [8, 9, 0, 1])
    pool.serve()  # scored against the posted guess: 8 and 9 of its four chosen
    st = pool.stats()
    assert st["chosen"] == 4 and st["guessed"] == 2
    pool.publish(0, [0, 1, 2, 3])  # no new guess: the slot's is the last request's
    pool.serve()
    st = pool.stats()
    assert st["posted"] == 1 and pool.loop.pending == 2  # its own, for the layer that followed 0 last time
    pool.publish(2, [4, 5, 12, 13])
    pool.serve()
    assert pool.stats()["guessed"] - st["guessed"] == 2  # 4 and 5: the router's 4-7


def test_the_pool_naps_only_after_a_run_that_served_nothing():
    """cpu_worker/main.py's loop: after a run of the C loop (or its own poll) it naps on its control
    socket only when the run came back for want of requests (-1) and served none; a pool that had
    napped and then served a request must poll on, or each later request waits out a nap."""
    from krasis.cpu_worker.main import still_idle

    assert still_idle(-1, served=False)
    assert not still_idle(-1, served=True)  # woke from a nap, served: busy again
    assert not still_idle(-2, served=False)  # its turn ended with a request waiting
    assert not still_idle(0, served=False)  # a request for Python: it is served next


def test_l2_size_is_read():
    assert 64 << 10 <= l2_bytes() <= 64 << 20


@pytest.fixture(scope="module")
def int4_model(tmp_path_factory):
    return tm.build(tmp_path_factory.mktemp("lookahead") / "model", "qwen3", **tm.QWEN3_CONFIGS["qwen3-base"])


def test_pool_with_lookahead_answers_as_without_and_scores_its_guesses(int4_model):
    prompts = [[(5 * i + 2 * j) % 150 + 1 for j in range(5 + 2 * i)] for i in range(2)]

    async def go(lookahead_kb):
        opts = RuntimeOptions(devices=["cpu"], cpu_workers=1, dtype="float32", cpu_bits=4, gpu_bits=4, group_size=16,
                              max_batch=2, lookahead_kb=lookahead_kb)
        engine = Engine(str(int4_model), opts)
        try:
            await engine.start()
            out = await generate_together(engine, prompts, 8, f"la{lookahead_kb}")
            return [o.tokens for o in out], (await engine.stats_reply()).stats["cpu_pool"][0]
        finally:
            await engine.close()

    on, pool_on = asyncio.run(go(None))
    off, pool_off = asyncio.run(go(0))
    assert on == off
    assert pool_off["lookahead_calls"] == 0
    moe_layers = json.loads((int4_model / "config.json").read_text())["num_hidden_layers"]  # every layer MoE
    # one lookahead after every call but the last layer's
    assert pool_on["lookahead_calls"] == pool_on["calls"] * (moe_layers - 1) // moe_layers
    assert pool_on["lookahead_bytes"] > 0 and 0 <= pool_on["guessed"] <= pool_on["chosen"] and pool_on["chosen"] > 0
    # the distinct experts its requests named, per layer: at least a token's top-k, at most the layer's
    shape = load_family(str(int4_model)).experts(0)
    assert shape.top_k <= pool_on["experts_asked"] <= shape.num
    assert pool_off["experts_asked"] == 0  # tracked by the lookahead only
