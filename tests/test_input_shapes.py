"""Every input shape works, drawn by Hypothesis: batches of requests whose prompts have any length
from 1 to --max-context - 1 (the chunk boundaries and ±1 around --prefill-chunk drawn often, and
max-context - 1 with one new token always), some cancelled at a random point and some ended by a
stop string that spans tokens. In float32 each request's tokens equal transformers' greedy tokens
on the same weights, for every family.

The examples are few and derandomized (a fixed sequence, the same on every CI run): each is a
round trip through every process, and the whole file stays near a minute on two cores."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import tiny_models as tm
from krasis.shared import protocol as P
from krasis.shared.client import AsyncClient

MAX_CONTEXT, CHUNK, MAX_NEW = 24, 5, 5
EDGES = [1, 2, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 2 * CHUNK + 1, MAX_CONTEXT - 2, MAX_CONTEXT - 1]
FAMILIES = ["qwen3", "deepseek", "qwen3_next", "gpt_oss"]


class Family:
    """A tiny model of one family behind a running service, with transformers' reference."""

    def __init__(self, path):
        from transformers import AutoTokenizer

        self.ref = tm.reference_model(path)
        self.tok = AutoTokenizer.from_pretrained(path)
        self.reference = {}

    def greedy(self, ids: tuple[int, ...], n: int) -> list[int]:
        """transformers' n greedy tokens (a longer run's prefix is also the answer for fewer)."""
        for (p, m), toks in self.reference.items():
            if p == ids and m >= n:
                return toks[:n]
        self.reference[ids, n] = tm.reference_greedy(self.ref, list(ids), n)
        return self.reference[ids, n]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    path = tm.build_with_tokenizer(tmp_path_factory.mktemp(request.param) / "m", request.param)
    with tm.Service(path, "--dtype", "float32", "--max-context", MAX_CONTEXT, "--prefill-chunk", CHUNK,
                    "--max-batch", 3) as svc:
        fam = Family(path)
        fam.svc = svc
        yield fam


@st.composite
def request_(draw, vocab: int = 300):
    n_prompt = draw(st.one_of(st.sampled_from(EDGES), st.integers(1, MAX_CONTEXT - 1)))
    ids = tuple(draw(st.lists(st.integers(0, vocab - 1), min_size=n_prompt, max_size=n_prompt)))
    n = draw(st.integers(1, min(MAX_NEW, MAX_CONTEXT - n_prompt)))
    # how it ends: all n tokens, a cancel after k of them, or a stop string at a token boundary
    end = draw(st.sampled_from(["length", "cancel", "stop"])) if n > 1 else "length"
    at = draw(st.integers(1, n - 1)) if end != "length" else 0
    return ids, n, end, at


def stop_at(fam: Family, toks: list[int], at: int) -> str | None:
    """A stop string across the boundary between tokens `at - 1` and `at` of the reference text, or
    None where that boundary has no character on one side."""
    head = fam.tok.decode(toks[:at], skip_special_tokens=True)
    text = fam.tok.decode(toks, skip_special_tokens=True)
    if not head or not text.startswith(head) or len(text) == len(head):
        return None
    return text[len(head) - 1 : len(head) + 1]


async def run(fam: Family, batch) -> list[tuple[list[int], str, P.Message]]:
    async with AsyncClient(fam.svc.endpoint) as c:

        async def one(ids, n, end, at):
            stop = [stop_at(fam, fam.greedy(ids, n), at)] if end == "stop" else []
            toks, text, last = [], "", None
            async for ev in c.stream(prompt_ids=list(ids), max_new_tokens=n, ignore_eos=True, stop=[s for s in stop if s]):
                if isinstance(ev, P.Tokens):
                    toks += ev.token_ids
                    text += ev.text
                    if end == "cancel" and len(toks) == at:
                        await c.sock.send_multipart(P.encode(P.Cancel(id=ev.id)))
                last = ev
            return toks, text, last, stop

        return await asyncio.gather(*(one(*r) for r in batch))


@settings(max_examples=4, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch=st.lists(request_(), min_size=1, max_size=3))
@example(batch=[((7,), 3, "length", 0)])  # a one-token prompt
@example(batch=[(tuple(range(3, 3 + MAX_CONTEXT - 1)), 1, "length", 0),  # max-context - 1 and one new token
                (tuple(range(9, 9 + CHUNK)), 2, "length", 0), (tuple(range(1, 2 + CHUNK)), 4, "cancel", 2)])
def test_tokens_equal_transformers_for_every_shape(family, batch):
    for (ids, n, end, at), (toks, text, last, stop) in zip(batch, asyncio.run(run(family, batch))):
        want = family.greedy(ids, n)
        assert isinstance(last, P.Done), last
        assert toks == want[: len(toks)], (ids, n, end)
        full = family.tok.decode(want, skip_special_tokens=True)
        if last.finish_reason == "length":
            assert toks == want and text == full
        elif last.finish_reason == "cancelled":
            assert end == "cancel" and len(toks) >= at
        else:
            assert last.finish_reason == "stop" and stop[0] and text == full[: full.find(stop[0])]
    assert family.svc.client.stats().stats["running"] == 0
