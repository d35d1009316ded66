"""The OpenAI-compatible HTTP API (`serve --http`) against the ZeroMQ front end of the same service:
the same greedy text, streamed or whole, OpenAI's error shape, and a dropped stream cancelled."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import aiohttp
import pytest

import tiny_models as tm
from test_runtime import text_model  # noqa: F401  (a tiny model with a tokenizer and a chat template)

MODEL = "tiny-moe"


@pytest.fixture(scope="module")
def svc(text_model):  # noqa: F811
    with socket.socket() as s:  # a free port; serve binds it a moment later
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tm.Service(text_model, "--dtype", "float32", "--http", f"127.0.0.1:{port}",
                    "--served-model-name", MODEL) as service:
        service.url = f"http://127.0.0.1:{port}"
        yield service


def http(svc, method: str, path: str, body=None, raw: bytes | None = None) -> tuple[int, dict | list[str]]:
    """One request; a JSON answer comes back parsed, an event stream as its list of `data:` payloads."""

    async def go():
        async with aiohttp.ClientSession() as s:
            data = raw if raw is not None else (json.dumps(body) if body is not None else None)
            async with s.request(method, svc.url + path, data=data) as r:
                if r.content_type == "text/event-stream":
                    text = await r.text()
                    return r.status, [line[6:] for line in text.split("\n\n") if line.startswith("data: ")]
                return r.status, await r.json()

    return asyncio.run(go())


def assert_error(status: int, reply: dict, want_status: int, param=None) -> None:
    assert status == want_status, reply
    err = reply["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param


def test_models_health_and_unknown_paths(svc):
    status, reply = http(svc, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in reply["data"]] == [MODEL]
    assert http(svc, "GET", "/health") == (200, {"status": "ok", "model": MODEL})
    assert_error(*http(svc, "GET", "/v1/nothing"), 404)
    assert_error(*http(svc, "POST", "/v1/completions", {"model": "gpt-4", "prompt": "x"}), 404, "model")


def test_completion_matches_the_zmq_client(svc):
    ref = svc.client.complete(prompt="The quick brown fox", max_new_tokens=8)
    req = {"model": MODEL, "max_tokens": 8, "temperature": 0}
    status, reply = http(svc, "POST", "/v1/completions", {**req, "prompt": "The quick brown fox"})
    assert status == 200 and reply["object"] == "text_completion"
    assert reply["choices"][0]["text"] == ref.text and reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"] == {"prompt_tokens": ref.done.prompt_tokens, "completion_tokens": 8,
                              "total_tokens": ref.done.prompt_tokens + 8}
    by_ids = svc.client.complete(prompt_ids=[5, 6, 7], max_new_tokens=8)
    status, reply = http(svc, "POST", "/v1/completions", {**req, "prompt": [5, 6, 7]})
    assert reply["choices"][0]["text"] == by_ids.text
    stop = ref.text[len(ref.text) // 2:][:2]
    status, reply = http(svc, "POST", "/v1/completions", {**req, "prompt": "The quick brown fox", "stop": stop})
    assert reply["choices"][0] == {"index": 0, "text": ref.text[: ref.text.find(stop)], "logprobs": None,
                                   "finish_reason": "stop"}

    status, events = http(svc, "POST", "/v1/completions", {**req, "prompt": "The quick brown fox", "stream": True,
                                                           "stream_options": {"include_usage": True}})
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == ref.text
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8


def test_chat_completion(svc):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where do experts run?"}]
    ref = svc.client.complete(messages=messages, max_new_tokens=6)
    req = {"model": MODEL, "messages": messages, "max_completion_tokens": 6, "temperature": 0}
    status, reply = http(svc, "POST", "/v1/chat/completions", req)
    assert status == 200 and reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": ref.text}
    assert reply["usage"]["prompt_tokens"] == ref.done.prompt_tokens
    status, events = http(svc, "POST", "/v1/chat/completions", {**req, "stream": True})
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == ref.text
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}


def test_bad_requests_get_openai_errors(svc):
    base = {"model": MODEL, "prompt": "hi"}
    assert_error(*http(svc, "POST", "/v1/completions", {**base, "n": 0}), 400, "n")
    assert_error(*http(svc, "POST", "/v1/completions", raw=b"{not json"), 400)
    assert_error(*http(svc, "POST", "/v1/completions", {"model": MODEL}), 400, "prompt")
    assert_error(*http(svc, "POST", "/v1/chat/completions", {"model": MODEL, "messages": []}), 400, "messages")
    assert_error(*http(svc, "POST", "/v1/completions", {**base, "temperature": "hot"}), 400, "temperature")
    assert_error(*http(svc, "POST", "/v1/completions", {**base, "presence_penalty": 1}), 400, "presence_penalty")
    status, reply = http(svc, "POST", "/v1/completions", {**base, "top_p": 0})  # refused by the engine
    assert_error(status, reply, 400)
    assert "top_p" in reply["error"]["message"]


def test_client_disconnect_cancels_the_request(svc):
    before = svc.client.stats().stats["generated_tokens"]

    async def read_a_little_and_leave():
        async with aiohttp.ClientSession() as s:
            body = {"model": MODEL, "prompt": "Mixture of", "max_tokens": 4000, "ignore_eos": True, "stream": True}
            async with s.post(svc.url + "/v1/completions", json=body) as r:
                await r.content.readuntil(b"\n\n")
                r.close()  # drops the connection

    asyncio.run(read_a_little_and_leave())
    deadline = time.monotonic() + 10
    while (stats := svc.client.stats().stats)["running"] or stats["waiting"]:
        assert time.monotonic() < deadline, stats
        time.sleep(0.1)
    # a few tokens at most pass between the first chunk and the cancel; a request that ran on would make thousands
    assert stats["generated_tokens"] - before < 1000


def test_a_failed_engine_answers_503():
    from types import SimpleNamespace

    from aiohttp.test_utils import TestClient, TestServer

    from krasis.coordinator.openai_api import OpenAIServer
    from krasis.shared import protocol as P

    # the engine's own failure path (a worker dying) stops `serve`, so the 503 is checked on a stand-in
    down = SimpleNamespace(health=lambda: P.HealthReply(status="down", model="m", workers=[]))

    async def go():
        async with TestClient(TestServer(OpenAIServer(down, MODEL).runner.app)) as c:
            r = await c.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})
            h = await c.get("/health")
            return r.status, await r.json(), h.status

    status, reply, health = asyncio.run(go())
    assert_error(status, reply, 503)
    assert health == 503
