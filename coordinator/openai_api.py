"""An OpenAI-compatible HTTP front end (docs/openai_api.md): /v1/completions, /v1/chat/completions
and /v1/models over the same Engine as the ZeroMQ front end, in the same event loop. Streaming
answers are Server-Sent Events; a client that goes away has its request cancelled."""

from __future__ import annotations

import json
import logging
import time
import uuid

from aiohttp import web

from ..shared import protocol as P
from .engine import Draining, Engine, QueueFull, RequestError

log = logging.getLogger("krasis.openai_api")

# Parameters this server does not implement, accepted only at the value that changes nothing, so
# clients that always send the defaults (as several SDKs do) still work and nobody gets silently
# different semantics.
NEUTRAL = {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logprobs": (None, False),
           "top_logprobs": (None, 0), "echo": (False,), "best_of": (None, 1), "logit_bias": (None, {}),
           "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"),
           "response_format": (None, {"type": "text"})}
FINISH = {"length": "length"}  # eos, a stop string, a cancel (the client is gone): "stop"
# Refused for now, not for what they ask: (status, seconds after which to try again)
BUSY = {QueueFull: (429, 1), Draining: (503, 5)}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after_s: int | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.retry_after_s = status, param, code, retry_after_s

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        headers = {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else None
        return web.json_response(self.body(), status=self.status, headers=headers)


def _get(body: dict, name: str, kind: type, default):
    v = body.get(name)
    if v is None:
        return default
    # JSON numbers: an int is a fine float; a bool is neither
    ok = isinstance(v, kind) if kind is not float else isinstance(v, (int, float))
    if not ok or (kind is not bool and isinstance(v, bool)):
        raise ApiError(400, f"'{name}' must be of type {kind.__name__}", name)
    return float(v) if kind is float else v


def _sampling(body: dict, max_name: str, default_max: int | None) -> P.SamplingParams:
    if _get(body, "n", int, 1) != 1:
        raise ApiError(400, "only n=1 is supported", "n")
    for name, neutral in NEUTRAL.items():
        if name in body and body[name] not in neutral:
            raise ApiError(400, f"'{name}' is not supported by this server", name)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of strings", "stop")
    max_tokens = _get(body, max_name, int, None)
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"'{max_name}' must be at least 1", max_name)
    # OpenAI's defaults (temperature 1), not the engine's greedy one: clients written for the
    # OpenAI API expect them.
    return P.SamplingParams(
        max_new_tokens=max_tokens or default_max, temperature=_get(body, "temperature", float, 1.0),
        top_p=_get(body, "top_p", float, 1.0), top_k=_get(body, "top_k", int, 0), seed=_get(body, "seed", int, None),
        stop=stop, ignore_eos=_get(body, "ignore_eos", bool, False),
    )


def _text_content(m: dict) -> dict:
    """Chat content given as a list of text parts (as newer SDKs send it) joined into the string
    chat templates expect."""
    c = m.get("content")
    if isinstance(c, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in c):
            raise ApiError(400, "only text content parts are supported", "messages")
        m = {**m, "content": "".join(p["text"] for p in c)}
    return m


@web.middleware
async def _errors(request: web.Request, handler):
    try:
        return await handler(request)
    except ApiError as e:
        return e.response()
    except web.HTTPException as e:  # aiohttp's own: unknown path (404), wrong method, body too large
        if e.status < 400:
            raise
        msg = f"unknown path {request.path}" if e.status == 404 else e.reason
        return ApiError(e.status, msg).response()
    except Exception as e:
        # A bug met by one request must not take the service down for everyone.
        log.exception("HTTP request failed")
        return ApiError(500, f"internal error: {type(e).__name__}: {e}").response()


class OpenAIServer:
    def __init__(self, engine: Engine, model_name: str):
        self.engine, self.model = engine, model_name
        self.created = int(time.time())
        # a prompt at a long --max-context, sent as token ids, is larger than aiohttp's 1 MiB default
        app = web.Application(middlewares=[_errors], client_max_size=64 << 20)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model:.+}", self.model_info)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        # handler_cancellation: a dropped connection cancels its handler even while it waits for the
        # next token (or the whole answer), which is what cancels the request in the engine
        # shutdown_timeout: stop() has cancelled every request, so what is still open after a few
        # seconds is a stuck client, not an answer being finished
        self.runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=5.0)

    async def start(self, host: str, port: int) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, host, port).start()

    async def stop(self) -> None:
        """Close the server; the engine has ended every request by now (a drain, or errors saying
        they were cut), so open streams write their last event and [DONE] and close."""
        await self.runner.cleanup()

    # --- endpoints ---------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        status = self.engine.health().status
        return web.json_response({"status": status, "model": self.model}, status=200 if status == "ok" else 503)

    def _card(self) -> dict:
        return {"id": self.model, "object": "model", "created": self.created, "owned_by": "krasis"}

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._card()]})

    async def model_info(self, request: web.Request) -> web.Response:
        self._check_model(request.match_info["model"])
        return web.json_response(self._card())

    def _check_model(self, name) -> None:
        if name is None:
            raise ApiError(400, "'model' is required", "model")
        if name != self.model:
            raise ApiError(404, f"the model '{name}' does not exist (this server serves '{self.model}')", "model",
                           "model_not_found")

    async def _body(self, request: web.Request) -> dict:
        try:
            body = json.loads(await request.read())
        except ValueError as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        self._check_model(body.get("model"))
        return body

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            text, ids = prompt, None
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            text, ids = None, prompt
        else:
            raise ApiError(400, "'prompt' must be a string or a non-empty list of token ids (one prompt per request)",
                           "prompt")
        gen = P.Generate(id=f"cmpl-{uuid.uuid4().hex}", prompt=text, prompt_ids=ids,
                         sampling=_sampling(body, "max_tokens", 16))
        return await self._serve(request, body, gen, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
            raise ApiError(400, "'messages' must be a non-empty list of objects", "messages")
        max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        # no max_tokens: to the end of the context (max_new_tokens null)
        gen = P.Generate(id=f"chatcmpl-{uuid.uuid4().hex}", messages=[_text_content(m) for m in msgs],
                         sampling=_sampling(body, max_name, None))
        return await self._serve(request, body, gen, chat=True)

    # --- running a request -------------------------------------------------------------------
    async def _serve(self, request: web.Request, body: dict, gen: P.Generate, chat: bool) -> web.StreamResponse:
        stream = _get(body, "stream", bool, False)
        usage_chunk = stream and isinstance(body.get("stream_options"), dict) and \
            body["stream_options"].get("include_usage") is True
        if self.engine.health().status == "down":  # while restarting, requests queue
            raise ApiError(503, "the service is down (a worker failed); see the server's log", code="service_unavailable")
        try:
            req = self.engine.submit(gen)
        except (QueueFull, Draining) as e:
            status, retry = BUSY[type(e)]
            raise ApiError(status, str(e), code="service_unavailable" if status == 503 else "rate_limit_exceeded",
                           retry_after_s=retry) from None
        except (RequestError, P.ProtocolError) as e:
            raise ApiError(400, str(e)) from None
        head = {"id": req.id, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.model}
        try:
            if stream:
                return await self._stream(request, req, head, chat, usage_chunk)
            return await self._whole(req, head, chat)
        finally:
            if not req.finished:  # the client went away (handler cancelled, or a write failed)
                self.engine.cancel(req.id)

    async def _whole(self, req, head: dict, chat: bool) -> web.Response:
        text = []
        while True:
            ev = await req.events.get()
            if isinstance(ev, P.Tokens):
                text.append(ev.text)
            elif isinstance(ev, P.Error):
                raise self._failure(ev)
            elif isinstance(ev, P.Done):
                out = "".join(text)
                choice = {"index": 0, "message": {"role": "assistant", "content": out}} if chat else \
                    {"index": 0, "text": out, "logprobs": None}
                choice["finish_reason"] = FINISH.get(ev.finish_reason, "stop")
                return web.json_response({**head, "choices": [choice], "usage": _usage(ev)})

    async def _stream(self, request: web.Request, req, head: dict, chat: bool, usage_chunk: bool) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        async def send(data) -> None:
            await resp.write(b"data: " + (data if isinstance(data, bytes) else json.dumps(data).encode()) + b"\n\n")

        def chunk(piece: dict | None, finish: str | None = None) -> dict:
            if piece is None:
                return {**head, "choices": []}
            c = {"index": 0, "delta": piece} if chat else {"index": 0, "text": piece.get("content", ""), "logprobs": None}
            return {**head, "choices": [dict(c, finish_reason=finish)]}

        try:
            if chat:
                await send(chunk({"role": "assistant", "content": ""}))
            while True:
                ev = await req.events.get()
                if isinstance(ev, P.Tokens) and ev.text:
                    await send(chunk({"content": ev.text}))
                elif isinstance(ev, P.Error):
                    await send(self._failure(ev).body())
                    break
                elif isinstance(ev, P.Done):
                    await send(chunk({}, FINISH.get(ev.finish_reason, "stop")))
                    if usage_chunk:
                        await send({**chunk(None), "usage": _usage(ev)})
                    break
            await send(b"[DONE]")
            await resp.write_eof()
        except ConnectionError:
            pass  # the client went away; _serve cancels the request
        return resp

    def _failure(self, ev: P.Error) -> ApiError:
        down = self.engine.health().status != "ok"
        return ApiError(503 if down else 500, ev.message, code="service_unavailable" if down else None)


def _usage(done: P.Done) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}
