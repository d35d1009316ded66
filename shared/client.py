"""Python clients for a krasis-coord service (protocol: docs/protocol.md), synchronous and asyncio.

    with Client("tcp://127.0.0.1:5555") as c:
        r = c.complete(prompt="Hello", max_new_tokens=32)
        print(r.text)

    async with AsyncClient(endpoint) as c:
        async for ev in c.stream(messages=[{"role": "user", "content": "hi"}]):
            ...

A client loads no torch (a tool beside an editor starts in a fraction of a second): tensors it
receives, such as the prompt logits, arrive as numpy arrays.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

import numpy as np
import zmq
import zmq.asyncio

from . import protocol as P
from .keys import Curve


class ServiceError(RuntimeError):
    """The service answered with an error message."""


@dataclass
class Completion:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    done: P.Done | None = None
    prompt_logits: np.ndarray | None = None  # float32 [prompt tokens, vocab], where asked for


def _generate_msg(prompt, prompt_ids, messages, prompt_logits, **sampling) -> P.Generate:
    return P.Generate(
        id=uuid.uuid4().hex, prompt=prompt, prompt_ids=prompt_ids, messages=messages,
        sampling=P.SamplingParams(**sampling), prompt_logits=prompt_logits,
    )


def _accumulate(c: Completion, ev: P.Message) -> None:
    if isinstance(ev, P.Tokens):
        c.token_ids += ev.token_ids
        c.text += ev.text
        if "prompt_logits" in ev.tensors:
            c.prompt_logits = ev.tensors["prompt_logits"]
    elif isinstance(ev, P.Done):
        c.done = ev
    elif isinstance(ev, P.Error):
        raise ServiceError(ev.message)


class Client:
    """`keys`: a keys folder holding krasis.key and client.key_secret (krasis-coord keygen; docs/deployment.md),
    for a service started with --keys; the connection is then CURVE-encrypted and authenticated."""

    def __init__(self, endpoint: str, timeout_s: float = 600.0, keys: str | None = None):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
        Curve(self.ctx, keys, "client").connect(self.sock, endpoint)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.sock.close(0)
        self.ctx.term()

    def send(self, msg: P.Message) -> None:
        self.sock.send_multipart(P.encode(msg))

    def recv(self) -> P.Message:
        try:
            return P.decode(self.sock.recv_multipart(), numpy=True)
        except zmq.Again:
            raise TimeoutError("no reply from the service") from None

    def stream(self, prompt=None, prompt_ids=None, messages=None, prompt_logits=False, **sampling):
        msg = _generate_msg(prompt, prompt_ids, messages, prompt_logits, **sampling)
        self.send(msg)
        while True:
            ev = self.recv()
            if getattr(ev, "id", msg.id) not in (msg.id, None):
                continue
            yield ev
            if isinstance(ev, (P.Done, P.Error)):
                return

    def complete(self, prompt=None, prompt_ids=None, messages=None, prompt_logits=False, **sampling) -> Completion:
        c = Completion()
        for ev in self.stream(prompt, prompt_ids, messages, prompt_logits, **sampling):
            _accumulate(c, ev)
        return c

    def health(self) -> P.HealthReply:
        self.send(P.Health())
        return self.recv()

    def stats(self) -> P.StatsReply:
        self.send(P.Stats())
        return self.recv()


class AsyncClient:
    """Many requests at once over one socket; replies are routed to their request by id. `keys` as
    for Client."""

    def __init__(self, endpoint: str, keys: str | None = None):
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        Curve(self.ctx, keys, "client").connect(self.sock, endpoint)
        self._queues: dict[str | None, asyncio.Queue] = {}
        self._reader: asyncio.Task | None = None

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self):
        if self._reader:
            self._reader.cancel()
        self.sock.close(0)
        self.ctx.term()

    async def _read(self):
        while True:
            ev = P.decode(await self.sock.recv_multipart(), numpy=True)
            q = self._queues.get(getattr(ev, "id", None)) or self._queues.get(None)
            if q is not None:
                q.put_nowait(ev)

    def _ensure_reader(self):
        if self._reader is None:
            self._reader = asyncio.create_task(self._read())

    async def stream(self, prompt=None, prompt_ids=None, messages=None, prompt_logits=False, **sampling):
        msg = _generate_msg(prompt, prompt_ids, messages, prompt_logits, **sampling)
        q = self._queues[msg.id] = asyncio.Queue()
        self._ensure_reader()
        await self.sock.send_multipart(P.encode(msg))
        try:
            while True:
                ev = await q.get()
                yield ev
                if isinstance(ev, (P.Done, P.Error)):
                    return
        finally:
            self._queues.pop(msg.id, None)

    async def complete(self, prompt=None, prompt_ids=None, messages=None, prompt_logits=False, **sampling) -> Completion:
        c = Completion()
        async for ev in self.stream(prompt, prompt_ids, messages, prompt_logits, **sampling):
            _accumulate(c, ev)
        return c

    async def request(self, msg: P.Message) -> P.Message:
        """A single-reply request (health, stats); replies without an id come back here."""
        q = self._queues[None] = asyncio.Queue()
        self._ensure_reader()
        await self.sock.send_multipart(P.encode(msg))
        try:
            return await q.get()
        finally:
            self._queues.pop(None, None)
