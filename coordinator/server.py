"""The client front end: a ZeroMQ ROUTER socket speaking the messages of shared/protocol.py
(docs/protocol.md). One task per generate request streams its events back to the client that sent
it; a malformed message gets an Error reply and changes nothing else."""

from __future__ import annotations

import asyncio
import logging

import zmq
import zmq.asyncio

from ..shared import protocol as P
from .engine import Engine, RequestError

log = logging.getLogger("krasis.server")


class Server:
    def __init__(self, engine: Engine, endpoint: str):
        self.engine = engine
        self.sock = engine.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)  # a vanished client's replies are dropped
        engine.curve.bind(self.sock, endpoint)  # CURVE on tcp with --keys
        self.endpoint = endpoint
        self._streams: set[asyncio.Task] = set()

    async def _send(self, ident: bytes, msg: P.Message) -> None:
        await self.sock.send_multipart([ident, *P.encode(msg)], copy=False)

    async def serve(self) -> None:
        try:
            while True:
                ident, *frames = await self.sock.recv_multipart()
                try:
                    await self._handle(ident, frames)
                except Exception as e:
                    # A bug met by one request must not take the service down for everyone.
                    log.exception("request failed")
                    await self._send(ident, P.Error(message=f"internal error: {type(e).__name__}: {e}"))
        finally:
            for t in self._streams:
                t.cancel()
            self.sock.close(0)

    async def flush(self, timeout_s: float = 5.0) -> None:
        """Wait (a while at most) for the streams to send their last events: after a drain every
        request has ended, but its Done or Error may still sit in its queue."""
        if self._streams:
            await asyncio.wait(set(self._streams), timeout=timeout_s)

    async def _handle(self, ident: bytes, frames: list) -> None:
        try:
            msg = P.decode(frames)
        except P.ProtocolError as e:
            await self._send(ident, P.Error(message=str(e)))
            return
        if isinstance(msg, P.Generate):
            try:
                req = self.engine.submit(msg)
            except (RequestError, P.ProtocolError) as e:
                await self._send(ident, P.Error(id=msg.id, message=str(e)))
                return
            task = asyncio.create_task(self._stream(ident, req))
            self._streams.add(task)
            task.add_done_callback(self._streams.discard)
        elif isinstance(msg, P.Cancel):
            if not self.engine.cancel(msg.id):
                await self._send(ident, P.Error(id=msg.id, message=f"no running request {msg.id!r}"))
        elif isinstance(msg, P.Health):
            await self._send(ident, self.engine.health())
        elif isinstance(msg, P.Stats):
            await self._send(ident, await self.engine.stats_reply())
        else:
            await self._send(ident, P.Error(message=f"'{msg.TYPE}' is not a client request"))

    async def _stream(self, ident: bytes, req) -> None:
        while True:
            ev = await req.events.get()
            await self._send(ident, ev)
            if isinstance(ev, (P.Done, P.Error)):
                return
