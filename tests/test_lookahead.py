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
from krasis.cpu_worker.lookahead import QUIET, Lookahead, l2_bytes
from krasis.shared.expert_store import ExpertFormat
from krasis.shared.models.family import ExpertShape
from krasis.shared.weights import load_family

HAVE_CC = any(shutil.which(n) for n in ([os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc"]))
pytestmark = pytest.mark.skipif(not HAVE_CC, reason="no C compiler")

HIDDEN, INTER, EXPERTS, TOP_K = 256, 128, 16, 4
FIRST, COUNT = 4, 8  # this block holds experts [4, 12) of 16


def block(fmt: ExpertFormat, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A block of experts in the store layout; the lookahead only reads bytes, so any bytes do."""
    spec = fmt.tensors(ExpertShape(EXPERTS, TOP_K, HIDDEN, INTER), COUNT)
    return {n: torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).view(dtype) if dtype != torch.uint8
            else torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8) for n, (dtype, shape) in spec.items()}


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


def layer_kernel(kind: str, gen: torch.Generator):
    """A bound C kernel over a block of random experts (valid scales: the output is compared)."""
    t = block(ExpertFormat(kind, group_size=32), gen)
    for name in ("w13.s", "w2.s"):
        t[name] = (torch.rand(t[name].shape, generator=gen) * 0.01).to(torch.bfloat16)
    return t, native.load().bind(t, int(kind[3:]), FIRST, COUNT, "silu", 2)


def test_kernel_then_answers_scores_notes_and_reads_ahead():
    """krasis_moe_layer_then: the same output as the plain call; the guess made for the request
    scored against its ids; its experts noted at the layer's request count; the slot answered (error
    word 0, reply word the request's number); the next layer's guessed experts of the block read,
    less those no request has asked for since quiet_from (hcs_hybrid's hot ones)."""
    gen = torch.Generator().manual_seed(3)
    t, run = layer_kernel("int4", gen)
    nxt = block(ExpertFormat("int4", group_size=32), gen)
    ahead = native.load().bind_lookahead(nxt, 4, FIRST, COUNT, 2)
    x = torch.randn(2, HIDDEN, generator=gen).bfloat16()
    ids = torch.tensor([[4, 6, 0, 11], [6, 7, 15, 1]], dtype=torch.int32)  # 4, 6, 7 and 11 are the block's
    w = torch.rand(2, TOP_K, generator=gen)
    want = torch.empty(2, HIDDEN)
    pairs = run(x, ids, w, want)
    prev = torch.tensor([[6, 11, 5, 3], [2, 9, 8, 1]], dtype=torch.int32)  # names 6 and 11 of the 4
    guess = torch.tensor([[5, 8, 9, 0], [8, 3, 1, 2]], dtype=torch.int32)  # next layer: 5, 8 and 9
    header = np.zeros(8, np.int64)
    header[5] = 99  # a stale error length: the answer clears it
    last, next_last = np.full(EXPERTS, -QUIET, np.int64), np.full(EXPERTS, 0, np.int64)
    next_last[8] = -5  # not asked for since before quiet_from: taken as hot
    words, seen = never_stop()
    ahead.prepare(guess, words, seen, 1 << 30)
    then = native.Then(reply=header.ctypes.data + 8, error=header.ctypes.data + 40, number=7, prev=prev.data_ptr(),
                       last=last.ctypes.data, asked=12, experts=EXPERTS, next=ahead.block_ptr, ahead=ahead.args_ptr,
                       next_last=next_last.ctypes.data, quiet_from=0)
    out = torch.full((2, HIDDEN), float("nan"))
    assert run(x, ids, w, out, then=then) == pairs == 5
    assert torch.equal(out, want)
    assert header[1] == 7 and header[5] == 0 and then.kernel_s > 0
    assert (then.guessed, then.chosen) == (2, 4)
    assert [e for e in range(EXPERTS) if last[e] == 12] == sorted({0, 1, 4, 6, 7, 11, 15})
    assert then.bytes == 2 * expert_bytes(nxt)  # 5 and 9; 8 is quiet
    # no guess pending: nothing scored; quiet_from < 0: every guessed expert of the block read
    then = native.Then(reply=header.ctypes.data + 8, error=header.ctypes.data + 40, number=8, prev=None,
                       last=last.ctypes.data, asked=13, experts=EXPERTS, next=ahead.block_ptr, ahead=ahead.args_ptr,
                       next_last=next_last.ctypes.data, quiet_from=-1)
    guess.copy_(torch.tensor([[5, 8, 9, 0], [8, 3, 1, 2]], dtype=torch.int32))
    run(x, ids, w, out, then=then)
    assert header[1] == 8 and (then.guessed, then.chosen) == (0, 0) and then.bytes == 3 * expert_bytes(nxt)
    # none of the request's experts is the block's (hcs_hybrid's hot ones come as -1): out is zero,
    # the request is answered and noted, and the lookahead still reads the next layer's guess
    none = torch.tensor([[-1, 0, 15, -1], [1, -1, 2, 3]], dtype=torch.int32)
    then = native.Then(reply=header.ctypes.data + 8, error=header.ctypes.data + 40, number=10, prev=prev.data_ptr(),
                       last=last.ctypes.data, asked=15, experts=EXPERTS, next=ahead.block_ptr, ahead=ahead.args_ptr,
                       next_last=next_last.ctypes.data, quiet_from=-1)
    guess.copy_(torch.tensor([[5, 8, 9, 0], [8, 3, 1, 2]], dtype=torch.int32))
    assert run(x, none, w, out, then=then) == 0
    assert header[1] == 10 and (out == 0).all() and (then.guessed, then.chosen) == (0, 0)
    assert last[15] == 15 and last[0] == 15 and then.bytes == 3 * expert_bytes(nxt)
    # the last layer: answered, nothing read
    then = native.Then(reply=header.ctypes.data + 8, error=header.ctypes.data + 40, number=11, last=last.ctypes.data,
                       asked=16, experts=EXPERTS)
    run(x, ids, w, out, then=then)
    assert header[1] == 11 and then.bytes == 0 and torch.equal(out, want)


def test_experts_never_asked_for_are_left_out_after_quiet_requests():
    """hcs_hybrid masks its hot experts out of the pool's requests; once a layer has had QUIET requests,
    the experts none of them asked for since are left out of its reads (quiet_from), and one asked for
    again comes back. The C kernel notes the experts a request asks for (stood in for here)."""

    class Ahead:  # what then() takes of a bound lookahead
        block_ptr = args_ptr = 1

        def prepare(self, *args):
            pass

    class Slot:
        hdr = np.zeros(8, np.int64)

    la = Lookahead({0: (1, Ahead())}, [], 1 << 20, {0: (0, 8), 1: (0, 8)}, {0: 8, 1: 8})
    slot = Slot()

    def request(layer, asked):
        t = la.then(layer, slot, 0, 1, 2, [])
        la.last[layer][asked] = la.asked[layer]  # the kernel's note
        la.settle(layer, t, 1, 2)
        return t.quiet_from if t.next else None

    froms = []
    for step in range(QUIET + 1):
        froms.append(request(0, step % 3))
        request(1, 6 if step == QUIET - 1 else step % 6)  # layer 1: expert 7 is hot, never asked for
    assert froms[:QUIET] == [-1] * QUIET  # too few requests to tell
    assert froms[QUIET] == 0 and (la.last[1] >= froms[QUIET]).tolist() == [1, 1, 1, 1, 1, 1, 1, 0]
    request(1, 7)  # the hot set changed: 7 is asked for
    assert la.last[1][7] >= request(0, 0)


def test_looks_ahead_at_the_layer_that_comes_next_to_the_pool():
    """With layer 1 decoded on the GPU (resident), the pool is asked for 0, 2, 3: once a step has shown
    it, a request for layer 0 reads ahead for layer 2 (and scores that guess there), not for 1."""

    class Ahead:
        def __init__(self, n):
            self.block_ptr, self.args_ptr = 100 + n, 200 + n

        def prepare(self, *args):
            pass

    class Slot:
        hdr = np.zeros(8, np.int64)

    la = Lookahead({0: (1, Ahead(1)), 1: (2, Ahead(2)), 2: (3, Ahead(3))}, [], 1 << 20,
                   {layer: (0, 8) for layer in range(4)}, {layer: 8 for layer in range(4)})
    slot = Slot()

    def request(layer):
        t = la.then(layer, slot, 0, 1, 2, [])
        target = t.next
        la.settle(layer, t, 1, 2)
        return target, t.prev

    assert [request(layer)[0] for layer in (0, 2, 3)] == [101, 103, None]  # first step: the store's next layer
    assert request(0)[0] == 102 and la.pending[0] == 2  # from then on: the layer that followed it
    assert request(2) == (103, la._guess[(1, 2)].data_ptr())  # the guess made for 2 is scored at 2


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
