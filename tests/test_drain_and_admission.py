"""SIGTERM drains: requests already taken finish, new ones are refused (HTTP 503 with Retry-After,
ZeroMQ "draining"), and the process exits 0 with no child left; what the drain timeout cuts ends
with an error, never a finish_reason that calls it complete. Admission control refuses at once what
cannot be served: past --max-queue (429 with Retry-After), or a prompt plus max tokens beyond the context."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time

import aiohttp
import pytest
from click.testing import CliRunner

import tiny_models as tm
from krasis.shared import protocol as P
from krasis.shared.client import Client

MODEL = "tiny"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tm.build_with_tokenizer(tmp_path_factory.mktemp("m") / "qwen3", "qwen3")  # text: chunks stream


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model, *extra):
    port = free_port()
    svc = tm.Service(model, "--dtype", "float32", "--http", f"127.0.0.1:{port}", "--served-model-name", MODEL,
                     "--max-context", "256", *extra)
    svc.url = f"http://127.0.0.1:{port}"
    return svc


def body(n: int, stream: bool = False, prompt=(5, 6, 7)) -> dict:
    return {"model": MODEL, "prompt": list(prompt), "max_tokens": n, "temperature": 0, "ignore_eos": True,
            "stream": stream}


async def read_stream(resp) -> list:
    """The `data:` payloads of an event stream, JSON parsed (the final [DONE] kept as the string)."""
    text = await resp.text()
    return [json.loads(e[6:]) if e[6:] != "[DONE]" else "[DONE]" for e in text.split("\n\n") if e.startswith("data: ")]


def wait_until(pred, timeout=60):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_admission_then_a_clean_drain(model):
    with serve(model, "--max-batch", "1", "--max-queue", "2", "--drain-timeout", "120") as svc, \
            Client(svc.endpoint, timeout_s=120) as q:
        c = svc.client

        async def go():
            async with aiohttp.ClientSession() as s:
                a = await s.post(svc.url + "/v1/completions", json=body(200, stream=True))  # long enough to outlast the checks below
                await a.content.readuntil(b"\n\n")
                # with --max-batch 1 these two wait behind a and fill the queue; the front end takes
                # one client's messages in order, so the third finds it full
                for i in range(3):
                    q.send(P.Generate(id=f"q{i}", prompt_ids=[5, 6, 7],
                                      sampling=P.SamplingParams(max_new_tokens=2, ignore_eos=True)))
                full = q.recv()
                assert isinstance(full, P.Error) and full.id == "q2" and full.message.startswith("queue full")
                over = await s.post(svc.url + "/v1/completions", json=body(2))
                assert over.status == 429 and over.headers["Retry-After"] == "1"
                assert "--max-queue 2" in (await over.json())["error"]["message"]
                long = await s.post(svc.url + "/v1/completions", json=body(254))  # 3 + 254 > 256
                err = (await long.json())["error"]["message"]
                assert long.status == 400 and "257 tokens exceeds --max-context 256" in err and "253" in err

                svc.proc.send_signal(signal.SIGTERM)
                wait_until(lambda: c.health().status == "draining")
                refused = await s.post(svc.url + "/v1/completions", json=body(2))
                assert refused.status == 503 and int(refused.headers["Retry-After"]) > 0
                health = await s.get(svc.url + "/health")
                assert health.status == 503 and (await health.json())["status"] == "draining"
                zmq_reply = list(c.stream(prompt_ids=[1, 2], max_new_tokens=2))[-1]
                assert isinstance(zmq_reply, P.Error) and zmq_reply.message.startswith("draining")
                # `krasis-coord status` says so, and exits 1 (not serving) for a monitor
                from krasis.coordinator.cli import main

                st = CliRunner().invoke(main, ["status", "--connect", svc.endpoint])
                assert st.exit_code == 1 and st.stdout.startswith(f"{svc.endpoint}: draining")
                return await read_stream(a)

        events = asyncio.run(go())
        # the stream taken before SIGTERM finished whole; so did the queued requests
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
        ends = []
        while len(ends) < 2:
            ev = q.recv()
            if isinstance(ev, (P.Done, P.Error)):
                ends.append(ev)
        assert all(isinstance(e, P.Done) and e.finish_reason == "length" for e in ends), ends
        assert svc.proc.wait(30) == 0
    tm.wait_gone(svc.worker_pids)


def test_the_drain_timeout_cuts_with_an_error(model):
    with serve(model, "--drain-timeout", "0.5") as svc:

        async def go():
            async with aiohttp.ClientSession() as s:
                a = await s.post(svc.url + "/v1/completions", json=body(200, stream=True))  # far longer than the drain timeout
                await a.content.readuntil(b"\n\n")
                svc.proc.send_signal(signal.SIGTERM)
                return await read_stream(a)

        events = asyncio.run(go())
        assert events[-1] == "[DONE]" and "cut" in events[-2]["error"]["message"]
        assert all(c.get("finish_reason") is None for e in events[:-2] for c in e["choices"])
        assert svc.proc.wait(30) == 1
    assert "1 request(s) cut at --drain-timeout" in svc.stderr
    tm.wait_gone(svc.worker_pids)
