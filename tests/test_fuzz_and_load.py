"""Malformed input in bulk and many clients at once: every malformed ZeroMQ message and HTTP body is
answered with an error (never a 500, never a generation), every request of a load with random
cancels ends (0 lost, 0 hung), and the service stays healthy throughout."""

from __future__ import annotations

import asyncio
import copy
import json
import random
import socket
import time

import aiohttp
import msgpack
import pytest

import tiny_models as tm
from krasis.shared import protocol as P

MODEL = "tiny"
SEED = 15  # the fuzz cases are drawn from a fixed seed: CI sees the same ones every run
VALID = {"v": P.PROTOCOL_VERSION, "type": "generate", "id": "x", "prompt_ids": [1, 2, 3],
         "sampling": {"max_new_tokens": 2, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "stop": []}}


def bad_sampling(m: dict, **kw) -> None:
    """Set sampling fields on a copy of whatever `sampling` map the message has (an earlier fault may
    have replaced it with a non-map, which is just as bad)."""
    m["sampling"] = {**(m["sampling"] if isinstance(m.get("sampling"), dict) else {}), **kw}


# Each of these alone makes VALID unservable, so any combination of them does too.
ZMQ_FAULTS = [
    lambda m: m.update(v=rnd.choice([0, P.PROTOCOL_VERSION + 1, str(P.PROTOCOL_VERSION), None])),
    lambda m: m.pop("v"),
    lambda m: m.update(type=rnd.choice(["generat", "", 3, "step", "logits", "ready", None])),
    lambda m: m.pop("id"),
    lambda m: m.update(id=rnd.choice([7, None, [], 1.5])),
    lambda m: m.update(prompt_ids=rnd.choice([[], "123", [1, "x"], [-1], [10**6], [1.5], None])),
    lambda m: m.update(prompt="also text"),
    lambda m: m.update(messages=[{"role": 1}]),
    lambda m: m.update(prompt_logits=rnd.choice(["yes", 1, []])),
    lambda m: m.update({rnd.choice(["colour", "tensors_", "ID"]): 1}),
    lambda m: m.update(sampling=rnd.choice([None, [], "greedy", 3])),
    lambda m: bad_sampling(m, max_new_tokens=rnd.choice([0, -5, "ten", 10**9, 2.5])),
    lambda m: bad_sampling(m, temperature=rnd.choice([-0.1, "hot", None, []])),
    lambda m: bad_sampling(m, top_p=rnd.choice([0, 1.5, -1, "all"])),
    lambda m: bad_sampling(m, top_k=rnd.choice([-1, "k", 0.5])),
    lambda m: bad_sampling(m, stop=rnd.choice([[""], "x", [1], None])),
    lambda m: bad_sampling(m, seed=rnd.choice(["s", 1.5, []])),
    lambda m: bad_sampling(m, unknown=True),
]
HTTP_FAULTS = [
    lambda b: b.pop("model"),
    lambda b: b.update(model=rnd.choice(["gpt-4", 3, None, ""])),
    lambda b: b.update(prompt=rnd.choice([None, 5, [], [1, "x"], [True], {"a": 1}, [10**6]])),
    lambda b: b.update(max_tokens=rnd.choice([0, -1, "many", 1.5, 10**9])),
    lambda b: b.update(temperature=rnd.choice(["hot", -1, [], True])),
    lambda b: b.update(top_p=rnd.choice([0, 2, "x"])),
    lambda b: b.update(n=rnd.choice([0, "1", 10**6])),
    lambda b: b.update(stop=rnd.choice([5, [5], [""], {"s": 1}])),
    lambda b: b.update(stream=rnd.choice(["yes", 1, []])),
    lambda b: b.update({rnd.choice(["presence_penalty", "frequency_penalty", "best_of", "logit_bias", "echo"]):
                        rnd.choice([1, 2, {"5": 1}, True])}),
    lambda b: b.update(seed=rnd.choice(["s", 1.5])),
]
rnd = random.Random(SEED)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    model = tm.build(tmp_path_factory.mktemp("m") / "qwen3", "qwen3")
    port = free_port()
    with tm.Service(model, "--dtype", "float32", "--max-context", "64", "--http", f"127.0.0.1:{port}",
                    "--served-model-name", MODEL) as service:
        service.url = f"http://127.0.0.1:{port}"
        yield service


def zmq_case() -> list[bytes]:
    kind = rnd.randrange(4)
    if kind == 0:  # bytes that are not a message header
        return [rnd.randbytes(rnd.randrange(0, 40))]
    if kind == 1:  # a valid header with a tensor frame no descriptor names
        return [msgpack.packb({"v": P.PROTOCOL_VERSION, "type": "health"}), rnd.randbytes(8)]
    m = copy.deepcopy(VALID)
    for fault in rnd.sample(ZMQ_FAULTS, rnd.randint(1, 3)):
        fault(m)
    return [msgpack.packb(m)]


def http_case() -> bytes:
    kind = rnd.randrange(4)
    if kind == 0:
        return rnd.randbytes(rnd.randrange(0, 40))
    if kind == 1:
        return json.dumps(rnd.choice([[], 1, "x", None, [{"model": MODEL}]])).encode()
    b = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0}
    for fault in rnd.sample(HTTP_FAULTS, rnd.randint(1, 3)):
        fault(b)
    return json.dumps(b).encode()


def test_fuzzed_zmq_messages_and_http_bodies_get_errors(svc):
    c = svc.client
    baseline = c.complete(prompt_ids=[4, 5, 6], max_new_tokens=4).token_ids
    cases = [zmq_case() for _ in range(1000)]
    for frames in cases:
        c.sock.send_multipart(frames)
    for frames in cases:  # a bad message is answered at once, in order
        reply = c.recv()
        assert isinstance(reply, P.Error) and reply.message and not reply.message.startswith("internal error"), \
            (frames, reply)

    async def post_all():
        async with aiohttp.ClientSession() as s:
            async def one(path, data):
                async with s.post(svc.url + path, data=data) as r:
                    return r.status, await r.json()

            return await asyncio.gather(*(one(rnd.choice(["/v1/completions", "/v1/chat/completions"]), http_case())
                                          for _ in range(500)))

    for status, reply in asyncio.run(post_all()):
        assert 400 <= status < 500 and reply["error"]["message"], (status, reply)
    assert c.health().status == "ok"
    stats = c.stats().stats
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert c.complete(prompt_ids=[4, 5, 6], max_new_tokens=4).token_ids == baseline


def test_load_with_random_cancels_loses_nothing(svc):
    """64 clients x 20 requests, streamed or whole; about one in five goes away at a random point
    (a dropped connection cancels its request). Every other one ends with all its tokens."""
    clients, per_client = 64, 20
    before = svc.client.stats().stats

    async def client(s: aiohttp.ClientSession, k: int) -> tuple[int, int]:
        r = random.Random(k)
        finished = cancelled = 0
        for _ in range(per_client):
            n, stream = r.randint(1, 3), r.random() < 0.5
            body = {"model": MODEL, "prompt": [r.randrange(1, 150) for _ in range(r.randint(1, 8))], "max_tokens": n,
                    "temperature": r.choice([0, 0.7]), "seed": k, "ignore_eos": True, "stream": stream,
                    "stream_options": {"include_usage": True} if stream else None}
            call = s.post(svc.url + "/v1/completions", json=body)
            if r.random() < 0.2:
                try:  # leave at a random point
                    async with asyncio.timeout(r.uniform(0, 0.3)):
                        async with call as resp:
                            await resp.read()
                except TimeoutError:
                    cancelled += 1
                    continue
            else:
                async with call as resp:
                    assert resp.status == 200, await resp.text()
                    if stream:
                        events = [json.loads(e[6:]) for e in (await resp.text()).split("\n\n")
                                  if e.startswith("data: {")]
                        usage, finish = events[-1]["usage"], events[-2]["choices"][0]["finish_reason"]
                    else:
                        reply = await resp.json()
                        usage, finish = reply["usage"], reply["choices"][0]["finish_reason"]
                assert finish == "length" and usage["completion_tokens"] == n
            finished += 1
        return finished, cancelled

    async def load():
        conn = aiohttp.TCPConnector(limit=clients)
        async with aiohttp.ClientSession(connector=conn) as s:
            async with asyncio.timeout(600):  # hung requests fail here rather than hang CI
                return await asyncio.gather(*(client(s, k) for k in range(clients)))

    results = asyncio.run(load())
    finished = sum(f for f, _ in results)
    assert finished + sum(c for _, c in results) == clients * per_client and finished > clients * per_client // 2
    deadline = time.monotonic() + 30
    while (stats := svc.client.stats().stats)["running"] or stats["waiting"]:  # the cancels reach the engine
        assert time.monotonic() < deadline, stats
        time.sleep(0.1)
    assert stats["errors"] == before["errors"]
    assert stats["completed"] - before["completed"] == stats["requests"] - before["requests"]
    assert svc.client.health().status == "ok"
