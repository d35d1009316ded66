"""An OpenAI-compatible HTTP front end (docs/openai_api.md): /v1/completions, /v1/chat/completions
and /v1/models over the same Engine as the ZeroMQ front end, in the same event loop. Streaming
answers are Server-Sent Events; a client that goes away has its request cancelled."""

from __future__ import annotations

import asyncio
import hmac
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
NEUTRAL = {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "echo": (False,), "best_of": (None, 1), "logit_bias": (None, {}),
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


def _logprobs(body: dict, chat: bool) -> int | None:
    """SamplingParams.logprobs from chat's `logprobs` (bool) and `top_logprobs`, or completions'
    `logprobs` (the number of alternatives)."""
    if chat:
        top = _get(body, "top_logprobs", int, None)
        if not _get(body, "logprobs", bool, False):
            if top:
                raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
            return None
        want, name = top or 0, "top_logprobs"
    else:
        want, name = _get(body, "logprobs", int, None), "logprobs"
        if want is None:
            return None
    if not 0 <= want <= P.MAX_LOGPROBS:
        raise ApiError(400, f"'{name}' must be in 0..{P.MAX_LOGPROBS}", name)
    return want


def _sampling(body: dict, max_name: str, default_max: int | None, chat: bool) -> P.SamplingParams:
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
        stop=stop, ignore_eos=_get(body, "ignore_eos", bool, False), logprobs=_logprobs(body, chat),
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


def _auth(keys: list[str]):
    """The API keys' check on /v1/ paths, as OpenAI clients send a key: `Authorization: Bearer KEY`.
    /health and /metrics stay open, for load balancers and Prometheus."""

    @web.middleware
    async def check(request: web.Request, handler):
        if request.path.startswith("/v1/"):
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not given.strip():
                raise ApiError(401, "no API key given: send it as the header 'Authorization: Bearer KEY'",
                               code="invalid_api_key")
            # compare_digest: the time taken does not tell how much of a guess was right
            if not any(hmac.compare_digest(given.strip().encode(), k.encode()) for k in keys):
                raise ApiError(401, "incorrect API key", code="invalid_api_key")
        return await handler(request)

    return check


class OpenAIServer:
    def __init__(self, engine: Engine, model_name: str, api_keys: list[str] = ()):
        self.engine, self.model = engine, model_name
        self.created = int(time.time())
        # a prompt at a long --max-context, sent as token ids, is larger than aiohttp's 1 MiB default
        app = web.Application(middlewares=[_errors, *([_auth(list(api_keys))] if api_keys else [])],
                              client_max_size=64 << 20)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
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

    async def metrics(self, request: web.Request) -> web.Response:
        return await self.engine.metrics.handler(request)

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
        # a list of prompts (strings or token id lists) is a batch; a list of ids alone is one prompt
        many = isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt)
        prompts = prompt if many else [prompt]
        if not all(isinstance(p, str) or _token_ids(p) for p in prompts):
            raise ApiError(400, "'prompt' must be a string, a non-empty list of token ids, or a list of those", "prompt")
        sampling, rid = _sampling(body, "max_tokens", 16, chat=False), f"cmpl-{uuid.uuid4().hex}"
        gens = [P.Generate(id=rid if len(prompts) == 1 else f"{rid}-{i}", sampling=sampling,
                           **({"prompt": p} if isinstance(p, str) else {"prompt_ids": p})) for i, p in enumerate(prompts)]
        return await self._serve(request, body, rid, gens, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
            raise ApiError(400, "'messages' must be a non-empty list of objects", "messages")
        max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        # no max_tokens: to the end of the context (max_new_tokens null)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        gen = P.Generate(id=rid, messages=[_text_content(m) for m in msgs], sampling=_sampling(body, max_name, None, chat=True))
        return await self._serve(request, body, rid, [gen], chat=True)

    # --- running a request -------------------------------------------------------------------
    async def _serve(self, request: web.Request, body: dict, rid: str, gens: list[P.Generate],
                     chat: bool) -> web.StreamResponse:
        """Run `n` choices of each prompt, choice j of prompt i at index i * n + j (as OpenAI
        numbers them); the choices of one prompt share its prefill."""
        stream = _get(body, "stream", bool, False)
        usage_chunk = stream and isinstance(body.get("stream_options"), dict) and \
            body["stream_options"].get("include_usage") is True
        if self.engine.health().status == "down":  # while restarting, requests queue
            raise ApiError(503, "the service is down (a worker failed); see the server's log", code="service_unavailable")
        n = _get(body, "n", int, 1)
        if not 1 <= n <= self.engine.opts.max_batch:
            raise ApiError(400, f"'n' must be in 1..{self.engine.opts.max_batch} (--max-batch)", "n")
        events, reqs = asyncio.Queue(), []
        try:
            try:
                for gen in gens:
                    reqs += self.engine.submit_choices(gen, n, "http", events)
            except (QueueFull, Draining) as e:
                status, retry = BUSY[type(e)]
                raise ApiError(status, str(e), code="service_unavailable" if status == 503 else "rate_limit_exceeded",
                               retry_after_s=retry) from None
            except (RequestError, P.ProtocolError) as e:
                raise ApiError(400, str(e)) from None
            head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                    "model": self.model}
            run = _Choices(self.engine.codec, reqs, n, events, chat)
            if stream:
                return await self._stream(request, run, head, usage_chunk)
            return await self._whole(run, head)
        finally:
            for r in reqs:
                if not r.finished:  # the client went away (handler cancelled, or a write failed), or a choice failed
                    self.engine.cancel(r.id)

    async def _whole(self, run: "_Choices", head: dict) -> web.Response:
        text = [[] for _ in run.reqs]
        lps = [[] for _ in run.reqs]
        finish = [None] * len(run.reqs)
        while None in finish:
            i, ev = await run.next()
            if isinstance(ev, P.Tokens):
                text[i].append(ev.text)
                lps[i] += zip(ev.token_ids, ev.logprobs or [])
            elif isinstance(ev, P.Error):
                raise self._failure(ev)
            elif isinstance(ev, P.Done):
                finish[i] = FINISH.get(ev.finish_reason, "stop")
        choices = []
        for i, (t, lp, f) in enumerate(zip(text, lps, finish)):
            out = "".join(t)
            c = {"index": i, "message": {"role": "assistant", "content": out}} if run.chat else {"index": i, "text": out}
            choices.append({**c, "logprobs": run.logprobs(i, lp), "finish_reason": f})
        return web.json_response({**head, "choices": choices, "usage": run.usage()})

    async def _stream(self, request: web.Request, run: "_Choices", head: dict, usage_chunk: bool) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        chat = run.chat
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        async def send(data) -> None:
            await resp.write(b"data: " + (data if isinstance(data, bytes) else json.dumps(data).encode()) + b"\n\n")

        def chunk(i: int, piece: dict, finish: str | None = None, lps: list | None = None) -> dict:
            c = {"index": i, "delta": piece} if chat else {"index": i, "text": piece.get("content", "")}
            c["logprobs"] = run.logprobs(i, lps or [])
            return {**head, "choices": [dict(c, finish_reason=finish)]}

        # logprobs of tokens whose text is held back (an incomplete character, a possible stop
        # string) go out with the next piece of text, or with the finish
        held = [[] for _ in run.reqs]
        try:
            if chat:
                for i in range(len(run.reqs)):
                    await send(chunk(i, {"role": "assistant", "content": ""}))
            ended = 0
            while ended < len(run.reqs):
                i, ev = await run.next()
                if isinstance(ev, P.Tokens):
                    held[i] += zip(ev.token_ids, ev.logprobs or [])
                    if ev.text:
                        await send(chunk(i, {"content": ev.text}, lps=held[i]))
                        held[i] = []
                elif isinstance(ev, P.Error):
                    await send(self._failure(ev).body())
                    break
                elif isinstance(ev, P.Done):
                    await send(chunk(i, {}, FINISH.get(ev.finish_reason, "stop"), held[i]))
                    ended += 1
            else:
                if usage_chunk:
                    await send({**head, "choices": [], "usage": run.usage()})
            await send(b"[DONE]")
            await resp.write_eof()
        except ConnectionError:
            pass  # the client went away; _serve cancels the request
        return resp

    def _failure(self, ev: P.Error) -> ApiError:
        down = self.engine.health().status != "ok"
        return ApiError(503 if down else 500, ev.message, code="service_unavailable" if down else None)


def _token_ids(p) -> bool:
    return isinstance(p, list) and bool(p) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)


class _Choices:
    """The requests of one HTTP request, their events on one queue, and how their answers read."""

    def __init__(self, codec, reqs: list, n: int, events: asyncio.Queue, chat: bool):
        self.codec, self.reqs, self.n, self.events, self.chat = codec, reqs, n, events, chat
        self.index = {r.id: i for i, r in enumerate(reqs)}
        self.done: dict[int, P.Done] = {}
        self.offset: dict[int, int] = {}  # characters of choice i's tokens given logprobs so far

    async def next(self) -> tuple[int, P.Message]:
        ev = await self.events.get()
        i = self.index[ev.id]
        if isinstance(ev, P.Done):
            self.done[i] = ev
        return i, ev

    def usage(self) -> dict:
        """Each prompt counted once, whatever its n; every choice's tokens."""
        prompt = sum(d.prompt_tokens for i, d in self.done.items() if i % self.n == 0)
        completion = sum(d.completion_tokens for d in self.done.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def logprobs(self, i: int, lps: list[tuple[int, P.TokenLogprobs]]):
        """OpenAI's logprobs object of choice i's next tokens `lps` ((id, logprobs) pairs; None when
        it did not ask): chat's {"content": [{token, logprob, bytes, top_logprobs}]}, or completions'
        {tokens, token_logprobs, top_logprobs, text_offset}, the offsets counted from the start of the
        choice's text. A token's text is its id decoded alone."""
        if self.reqs[i].params.logprobs is None:
            return None
        tok = self.codec.decode
        if self.chat:
            entry = lambda t, lp: {"token": tok([t]), "logprob": lp, "bytes": list(tok([t]).encode())}  # noqa: E731
            return {"content": [{**entry(t, lp.logprob), "top_logprobs": [entry(a, b) for a, b in zip(lp.top_ids, lp.top_logprobs)]}
                                for t, lp in lps]}
        tokens, offsets = [tok([t]) for t, _ in lps], []
        for t in tokens:
            offsets.append(self.offset.get(i, 0))
            self.offset[i] = offsets[-1] + len(t)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for _, lp in lps], "text_offset": offsets,
                "top_logprobs": [{tok([a]): b for a, b in zip(lp.top_ids, lp.top_logprobs)} for _, lp in lps]}
