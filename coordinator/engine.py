"""The coordinator's engine: it owns the worker processes, the requests and the schedule.

Loop: admit waiting requests by prefilling their whole prompts in one step (the GPU stages run it
layer by layer in chunks of `prefill_chunk` tokens, the routed experts on the GPU workers, each
streamed expert crossing PCIe once per step), then run one decode step for every running request together (the
routed experts on the CPU pool, so one read of an expert serves every token that chose it). The last
stage samples each next token on its device with a draw made here from the request's seeded
generator (shared/sampling.py) and sends back token ids; stop conditions and detokenisation happen here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import sys
import time
from collections import deque
from dataclasses import dataclass, field

import torch
import zmq
import zmq.asyncio

from ..shared import protocol as P
from ..shared.keys import Curve
from ..shared.models.family import ConfigError
from ..shared.sampling import Sampler, pick
from ..shared.weights import load_family
from .convert import prepare
from .hosts import HostGroup, start_hosts
from .local_group import LocalStages, start_local
from .metrics import Metrics
from .plan import split_layers
from .processes import Endpoints, KeptStores, Prestarted, RuntimeOptions, WorkerDied, WorkerGroup
from .tokenizer import Detokenizer, TextCodec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RESTART_WINDOW_S = 600.0  # --max-restarts counts the restarts within this many seconds
# A group that fails to start is tried again after this, doubling up to RESTART_BACKOFF_MAX_S: a
# fault that lasts (a device gone, memory short) should not spin, one that passes should cost little.
RESTART_BACKOFF_S = 0.5
RESTART_BACKOFF_MAX_S = 10.0
# Where decode's time goes, summed in the stats as decode_{part}_s over consecutive decode steps: in
# the last stage from a step's arrival to its reply (worker), and before that since the previous
# step's reply left (between: what the messages and the coordinator cost that the stage waited for).
DECODE_PARTS = ("worker", "between")


def run(coro):
    """Run the coordinator's event loop to the end of `coro`: uvloop where installed (its loop wakes
    on a socket sooner than asyncio's own), else asyncio's."""
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


class RequestError(ValueError):
    """A request that cannot be served; the text is sent to the client."""


class QueueFull(RequestError):
    """--max-queue requests already wait: refused now, worth sending again soon (HTTP 429)."""


class Draining(RequestError):
    """The service is stopping (SIGTERM, Ctrl-C) and takes no new requests (HTTP 503)."""


class StepFailed(RuntimeError):
    pass


@dataclass
class Request:
    id: str
    prompt_ids: list[int]
    params: P.SamplingParams
    prompt_logits: bool
    seq: int
    sampler: Sampler
    detok: Detokenizer
    max_new: int
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    generated: list[int] = field(default_factory=list)
    pending: int = 0  # decode steps sent for it whose tokens have not come back
    ahead: deque = field(default_factory=deque)  # draws of tokens asked for that have not come back, in order
    replays: int = 0  # times its workers died under it and it was prefilled again
    text: str = ""  # generated text so far (stop strings are searched here)
    sent: int = 0  # characters of `text` already streamed
    cancelled: bool = False
    finished: bool = False
    frontend: str = "zmq"  # for the metrics: zmq or http
    # the other choices of its prompt (n > 1), until its prefill forks its cache into them; they
    # know it as their leader till then
    forks: list["Request"] = field(default_factory=list)
    leader: "Request | None" = None
    t_arrive: float = field(default_factory=time.perf_counter)
    t_prefill: float = 0.0
    t_first: float = 0.0
    t_last: float = 0.0

    @property
    def pos(self) -> int:
        """Position of the token to feed next (the last generated one)."""
        return len(self.prompt_ids) + len(self.generated) - 1

    def context_ids(self) -> list[int]:
        """What a prefill must run: the prompt and, for a request replayed after a worker fault,
        every token it has generated. The prefill then samples the next new token, so the client
        sees none twice and none skipped, and the cache ends as an undisturbed run's would."""
        return self.prompt_ids + self.generated

    def draw(self, i: int) -> P.Draw:
        """The draw of generated token i. Draws are made in token order and kept until their
        token comes back: a step lost with its workers is asked again with the same numbers, so a
        seeded request continues after a replay exactly as it would have without the fault."""
        j = i - len(self.generated)
        if j == len(self.ahead):
            self.ahead.append(self.sampler.draw())
        return self.ahead[j]


def _logprobs(req: Request, out: dict[str, torch.Tensor], row: int) -> P.TokenLogprobs | None:
    """Row `row` of a pick's logprobs (shared/sampling.py), cut to what the request asked for."""
    k = req.params.logprobs
    if k is None:
        return None
    return P.TokenLogprobs(logprob=float(out["logprobs"][row]), top_ids=out["top_ids"][row, :k].tolist(),
                           top_logprobs=out["top_logprobs"][row, :k].tolist())


def stream_decode(o: RuntimeOptions) -> str:
    """--stream-decode as the workers take it: `auto` streams a decode step only where the GPU's
    experts are the pool's numbers (the same --gpu-bits and --cpu-bits). Else a streamed step would
    compute with other weights, and a request's tokens would follow which runner the step times
    chose, i.e. the machine's load (the graphs test's DeepSeek case diverged on exactly that)."""
    if o.stream_decode == "auto" and o.gpu_bits != o.cpu_bits:
        return "off"
    return o.stream_decode


def strategy_spec(model_dir: str, o: RuntimeOptions) -> dict:
    """The GPU workers' strategy settings: the options given, else the winner `optimize` stored
    for this model, else pure_cpu decode and the prefill strategy each GPU worker's VRAM plan
    chooses (gpu_worker/vram_budget.py: AUTO_PREFILL)."""
    from .state import stored_winner, state_path

    won = stored_winner(model_dir)
    kv = o.kv_dtype if o.kv_dtype != "auto" else ("bf16" if o.dtype == "float32" else "fp8")
    return dict(
        prefill_strategy=o.prefill_strategy or won.get("prefill"),  # None: the worker's VRAM plan chooses
        decode_strategy=o.decode_strategy or won.get("decode", "pure_cpu"), stream_decode=stream_decode(o),
        resident_decode=o.resident_decode, pcie_share=o.pcie_share,
        vram_budget=o.vram_budget, kv_dtype=kv, prefill_chunk=o.prefill_chunk,
        hcs_path=str(state_path(model_dir, "hcs_counts.json")),
    )


def validate_devices(devices: list[str]) -> None:
    if not devices:
        raise ConfigError("--devices is empty")
    for d in devices:
        try:
            dev = torch.device(d)
        except RuntimeError:
            raise ConfigError(f"device {d!r} is not a device name (cpu, cuda:0, ...)") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(f"device {d}: CUDA is not available on this machine")
            if (dev.index or 0) >= torch.cuda.device_count():
                raise ConfigError(f"device {d}: only {torch.cuda.device_count()} CUDA device(s)")
        elif dev.type != "cpu":
            raise ConfigError(f"device {d}: only cpu and cuda devices are supported")


class Engine:
    def __init__(self, model_dir: str, opts: RuntimeOptions, max_restarts: int = 0, max_replays: int = 2,
                 max_queue: int = 256, prestarted: Prestarted | None = None):
        """`prestarted`: workers already importing (coordinator/processes.py); a group hands its specs
        to them while any is left, and starts processes of its own after that (a restart)."""
        self.model_dir, self.opts, self.max_restarts = str(model_dir), opts, max_restarts
        self.prestarted = prestarted
        self.max_replays, self.max_queue = max_replays, max_queue
        if opts.dtype not in DTYPES:
            raise ConfigError(f"--dtype {opts.dtype} is not one of {', '.join(DTYPES)}")
        if opts.max_context < 2:
            raise ConfigError("--max-context must be at least 2")
        self.family = load_family(model_dir)
        self.codec = TextCodec(model_dir)
        self.caches = None  # with --hosts each agent checks its devices and prepares its caches (coordinator/hosts.py)
        if not opts.hosts:
            self.caches = prepare(model_dir, self.family, opts)  # checks the checkpoint's tensors too
            validate_devices(opts.devices)
            self.plan = split_layers(self.family, len(opts.devices), opts.pp_layers)
        self.eos = set(self.family.eos_token_ids())
        self.group = WorkerGroup()
        # a restart's group finds the experts in RAM; those of the command's other engines too
        self.stores = prestarted.stores if prestarted is not None else KeptStores()
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._step_ids = itertools.count()
        self._futures: dict[int, asyncio.Future] = {}
        self._inflight: deque[tuple[list[Request], asyncio.Future]] = deque()  # decode steps sent, oldest first
        self._last_out: float | None = None  # when the last decode step's reply left the last stage
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._fatal: BaseException | None = None
        self._broken: WorkerDied | None = None  # the group's workers are unusable; the schedule restarts them
        self.restarting = False
        self.draining = False
        self._drained = asyncio.Event()  # set when draining and no request is left
        self._restart_times: list[float] = []
        self.workers: list[dict] = []
        self.head, self.pool_ctl, self._reader_task = None, [], None
        self.stats = {"requests": 0, "completed": 0, "errors": 0, "prompt_tokens": 0, "generated_tokens": 0,
                      "restarts": 0, "restart_s": 0.0, "replays": 0, "replayed_tokens": 0, "decode_steps": 0, **{f"decode_{k}_s": 0.0 for k in DECODE_PARTS}}
        self.closed = False
        self.metrics = Metrics(self)
        self._pool_lock = asyncio.Lock()  # one stats query at a time on the pool control sockets

    # --- start-up ----------------------------------------------------------------------------
    async def start(self) -> None:
        self.ctx = zmq.asyncio.Context()
        self.curve = Curve(self.ctx, self.opts.keys)
        await self._start_group()
        self._tasks = [asyncio.create_task(self._schedule()), asyncio.create_task(self._watch())]

    async def _start_group(self) -> None:
        """Start every worker and the sockets to them; a restart runs this again on fresh endpoints,
        so nothing a dead group sent can reach the new one."""
        opts = self.opts
        self.workers = []
        ep = Endpoints()
        self.results = self.ctx.socket(zmq.PULL)
        self.results.setsockopt(zmq.LINGER, 0)
        if opts.hosts:  # the agents start the workers, each on its machine
            self.group, stage0 = await start_hosts(self)
            pool_eps = []
        else:
            self.group = WorkerGroup(self.prestarted)
            self.results.bind(ep("results"))
            world = len(opts.devices)
            stages = LocalStages(list(range(world)), self.plan, opts.devices, {r: ep(f"stage{r}") for r in range(world)},
                                 ep("results"), ep("results"))
            pool_eps = await start_local(self.group, self.family, self.model_dir, opts, self.caches, stages,
                                         self.strategy_spec(), ep, self._await_ready, self.stores)
            stage0 = ep("stage0")
        # the pools, then the stages in pipeline order, however their Ready messages interleaved
        # (the GPU workers start beside the pool): readers take the last stage as workers[-1]
        self.workers.sort(key=lambda w: (w["role"] == "gpu", w["rank"]))
        self.head = self.ctx.socket(zmq.PUSH)
        self.head.setsockopt(zmq.LINGER, 0)
        self.curve.connect(self.head, stage0)
        self.pool_ctl = []
        for e in pool_eps:
            s = self.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(e)
            self.pool_ctl.append(s)
        self._reader_task = asyncio.create_task(self._reader())

    def strategy_spec(self) -> dict:
        return strategy_spec(self.model_dir, self.opts)

    async def _await_ready(self, count: int, bar) -> None:
        ready, progress = 0, {}
        while ready < count:
            self.group.check()
            if not await self.results.poll(200):
                continue
            msg = P.decode(await self.results.recv_multipart())
            if isinstance(msg, P.Progress):
                progress[(msg.role, msg.rank)] = (msg.done, msg.total)
                bar.total = sum(t for _, t in progress.values())
                bar.n = sum(d for d, _ in progress.values())
                bar.refresh()
            elif isinstance(msg, P.Ready):
                ready += 1
                self.workers.append({"role": msg.role, "rank": msg.rank, "pid": msg.pid, "ready_at": time.time(), **msg.info})
            elif isinstance(msg, P.WorkerError):
                raise WorkerDied(f"{msg.role}_worker {msg.rank} failed to start: {msg.message}")

    # --- background tasks --------------------------------------------------------------------
    async def _reader(self) -> None:
        while True:
            msg = P.decode(await self.results.recv_multipart(copy=False))
            if isinstance(msg, P.Logits):
                fut = self._futures.pop(msg.step, None)
                if fut and not fut.done():
                    fut.set_result((msg, time.monotonic()))
            elif isinstance(msg, P.WorkerError):
                fut = self._futures.pop(msg.step, None)
                if fut and not fut.done():
                    fut.set_exception(StepFailed(f"{msg.role}_worker {msg.rank}: {msg.message}"))
            elif isinstance(msg, P.WorkerInfo):
                for w in self.workers:
                    if (w["role"], w["rank"]) == (msg.role, msg.rank):
                        w.update(msg.info)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            if self._broken is None and not self.restarting:  # a restart checks the new group itself
                try:
                    self.group.check()
                except WorkerDied as e:
                    self._break(e)

    def _break(self, e: BaseException) -> None:
        """Fail the steps in flight (their replies will never come) and wake the schedule to deal with it."""
        if isinstance(e, WorkerDied):
            self._broken = e
        for fut in self._futures.values():
            if not fut.done():
                fut.set_exception(e)
        self._futures.clear()
        self._wake.set()

    def _die(self, e: BaseException) -> None:
        self._fatal = e
        self._break(e)
        self.fail_all(str(e))

    def fail_all(self, message: str) -> None:
        """End every request, running or waiting, with an error saying `message`."""
        for req in list(self.requests.values()):
            self._fail(req, message)

    def _may_restart(self) -> bool:
        now = time.monotonic()
        self._restart_times = [t for t in self._restart_times if now - t < RESTART_WINDOW_S]
        return len(self._restart_times) < self.max_restarts

    async def _restart(self, cause: BaseException) -> None:
        """Replace the whole group: a GPU worker's KV cache and mailboxes pair with the pool processes,
        so no worker can be restarted alone. Requests that had reached the workers go back to the
        front of the queue to be prefilled again (_requeue); the waiting ones stay queued. A group
        that fails to start is replaced again after a backoff, within --max-restarts."""
        self.restarting, t0 = True, time.monotonic()
        self._requeue(cause)
        for _, fut in self._inflight:  # failed with the group; read here, or asyncio logs each as unhandled
            if fut.done() and not fut.cancelled():
                fut.exception()
        self._inflight.clear()
        self._last_out = None
        backoff = RESTART_BACKOFF_S
        while True:
            if not self._may_restart():
                raise cause
            self._restart_times.append(time.monotonic())
            self.stats["restarts"] += 1
            print(f"krasis: {cause}; restarting the workers (restart {len(self._restart_times)} of "
                  f"{self.max_restarts} within {RESTART_WINDOW_S / 60:g} min)", file=sys.stderr, flush=True)
            await self._stop_group()
            try:
                await self._start_group()
                break
            except Exception as e:  # a fault inside the restart (a worker killed while loading, ...)
                cause = e
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, RESTART_BACKOFF_MAX_S)
        self._broken, self.restarting = None, False
        took = time.monotonic() - t0
        self.stats["restart_s"] += took
        print(f"krasis: workers ready again after {took:.2f} s", file=sys.stderr, flush=True)
        self._wake.set()

    def _requeue(self, cause: BaseException) -> None:
        """Put the requests the dead group held back at the front of the queue, in their order, to
        be prefilled again from their prompt and tokens so far; one replayed more than
        --max-replays times fails instead."""
        # a choice not forked yet goes with its leader
        for req in sorted((r for r in self.requests.values() if r not in self.waiting and r.leader is None),
                          key=lambda r: -r.seq):
            req.pending, req.replays = 0, req.replays + 1
            if req.replays > self.max_replays:
                self._fail(req, f"lost to worker failures {req.replays} times, more than --max-replays "
                                f"{self.max_replays} (last: {cause})")
            else:
                self.running.pop(req.seq, None)
                self.waiting.appendleft(req)
                self.stats["replays"] += 1

    async def _stop_group(self) -> None:
        """Close the sockets to the group and kill its workers (what a failed start left included)."""
        if self._reader_task is not None:
            self._reader_task.cancel()
        async with self._pool_lock:  # closing a socket under a stats query would cancel the front end's task
            for s in [self.head, *self.pool_ctl, self.results]:
                if s is not None:
                    s.close(0)
            self.head, self.pool_ctl, self.results = None, [], None
        await asyncio.get_running_loop().run_in_executor(None, self.group.kill_all)

    # --- requests ----------------------------------------------------------------------------
    def submit(self, gen: P.Generate, frontend: str = "zmq") -> Request:
        """Validate and queue a request; RequestError (or ProtocolError) if it cannot be served."""
        return self.submit_choices(gen, 1, frontend)[0]

    def submit_choices(self, gen: P.Generate, n: int, frontend: str, events: asyncio.Queue | None = None) -> list[Request]:
        """`n` requests for one prompt (ids `ID/0` .. when n > 1; choice i seeded with seed + i) that
        share its prefill: the first is queued, and its prefill's cache is copied to the others
        (docs/openai_api.md: n). Their events go to `events` when given (one queue for several)."""
        if self._fatal is not None:
            raise RequestError(f"service is down: {self._fatal}")
        if self.draining:
            raise Draining("draining: the service is stopping and takes no new requests")
        gen.validate()
        ids_of = [gen.id] if n == 1 else [f"{gen.id}/{i}" for i in range(n)]
        if any(i in self.requests for i in ids_of):
            raise RequestError(f"request id {gen.id!r} is already in use")
        try:
            if gen.prompt_ids is not None:
                ids = gen.prompt_ids
            elif gen.prompt is not None:
                ids = self.codec.encode(gen.prompt)
            else:
                ids = self.codec.encode_chat(gen.messages)
        except ValueError as e:
            raise RequestError(str(e)) from None
        if not ids:
            raise RequestError("the prompt encodes to no tokens")
        bad = [t for t in ids if not 0 <= t < self.family.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary (0..{self.family.vocab_size - 1})")
        if len(ids) >= self.opts.max_context:
            raise RequestError(f"prompt has {len(ids)} tokens; --max-context is {self.opts.max_context}")
        # Refused now, not cut mid-stream: a sequence's KV cache holds at most --max-context tokens
        # (the VRAM plan reserves one such sequence: gpu_worker/vram_budget.py).
        room, want = self.opts.max_context - len(ids), gen.sampling.max_new_tokens
        if want is not None and want > room:
            raise RequestError(f"prompt ({len(ids)} tokens) + max_new_tokens ({want}) = {len(ids) + want} tokens "
                               f"exceeds --max-context {self.opts.max_context}; at most {room} new tokens fit")
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"queue full: {len(self.waiting)} requests wait (--max-queue {self.max_queue}); "
                            "try again shortly")
        seed = gen.sampling.seed
        reqs = [Request(
            id=rid, prompt_ids=list(ids), params=gen.sampling, prompt_logits=gen.prompt_logits,
            seq=next(self._seq_ids), detok=Detokenizer(self.codec), frontend=frontend,
            sampler=Sampler(dataclasses.replace(gen.sampling, seed=None if seed is None else seed + i)),
            max_new=room if want is None else want, **({"events": events} if events is not None else {}),
        ) for i, rid in enumerate(ids_of)]
        reqs[0].forks = reqs[1:]
        for req in reqs:
            req.leader = reqs[0] if req is not reqs[0] else None
            self.requests[req.id] = req
        self.waiting.append(reqs[0])
        self.stats["requests"] += n
        self._wake.set()
        return reqs

    def cancel(self, rid: str) -> bool:
        req = self.requests.get(rid)
        if req is None:
            return False
        req.cancelled = True
        self._wake.set()
        return True

    async def generate(self, gen: P.Generate):
        """Submit and yield the request's Tokens messages, then its Done (or Error)."""
        req = self.submit(gen)
        while True:
            msg = await req.events.get()
            yield msg
            if isinstance(msg, (P.Done, P.Error)):
                return

    # --- the schedule ------------------------------------------------------------------------
    async def _schedule(self) -> None:
        while True:
            try:
                return await self._schedule_loop()
            except Exception as e:  # a dead worker, or a step the workers did not survive
                if self._fatal is not None:
                    return
                cause = e
            try:
                await self._restart(cause)
            except Exception as e:  # past --max-restarts: nothing left to try here
                return self._die(e)

    async def _schedule_loop(self) -> None:
        while True:
            if self._fatal is not None:
                return
            if self._broken is not None:
                raise self._broken
            for req in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(req)
                self._finish(req, "cancelled")
            for req in [r for r in self.running.values() if r.cancelled]:
                self._finish(req, "cancelled")
            # a prompt's choices (n > 1) all join the batch at its prefill
            if self.waiting and len(self.running) + len(self.waiting[0].forks) < self.opts.max_batch:
                await self._prefill(self._prefill_batch())
            elif self.running or self._inflight:
                await self._decode()
            else:
                self._wake.clear()
                await self._wake.wait()

    def _send(self, slices: list[P.SeqSlice], tokens: list[int], decode: bool) -> asyncio.Future:
        """Send a step; the future gets (its Logits reply, when that arrived here)."""
        sid = next(self._step_ids)
        fut = asyncio.get_running_loop().create_future()
        self._futures[sid] = fut
        msg = P.Step(step=sid, slices=slices, decode=decode)
        msg.tensors = {"tokens": torch.tensor(tokens, dtype=torch.int64)}
        # zmq.asyncio sends at once when it can (a PUSH to a connected peer): the steps leave in order
        self.head.send_multipart(P.encode(msg), copy=False)
        return fut

    async def _step(self, slices: list[P.SeqSlice], tokens: list[int], decode: bool) -> P.Logits:
        out, _ = await self._send(slices, tokens, decode)
        return out

    def _prefill_batch(self) -> list[Request]:
        """The waiting requests to prefill together, oldest first: as many as the decode batch has
        room for (a prompt with n choices takes n places), up to --max-context prompt tokens in all
        (at least one request). One step runs them through each layer together, so a streamed
        layer's experts cross PCIe once for all."""
        room, budget, batch = self.opts.max_batch - len(self.running), self.opts.max_context, []
        while self.waiting:
            n, choices = len(self.waiting[0].context_ids()), 1 + len(self.waiting[0].forks)
            if batch and (n > budget or choices > room):
                break
            budget, room = budget - n, room - choices
            batch.append(self.waiting.popleft())
        return batch

    async def _prefill(self, reqs: list[Request]) -> None:
        """Whole prompts in one step (the GPU stages chunk them: gpu_worker/stage.py), a replayed
        request's with the tokens it has generated (Request.context_ids); its reply holds each
        request's next token (or, for prompt_logits, the logits of every position, sampled here)."""
        now, slices, ids = time.perf_counter(), [], []
        for r in reqs:
            ctx = r.context_ids()
            if not r.generated:
                r.t_prefill = now
            if r.prompt_logits and not r.generated:
                slices.append(P.SeqSlice(seq=r.seq, start=0, n=len(ctx), logits="all"))
            elif r.forks:  # each choice's first token is drawn here, from the prompt's last row
                slices.append(P.SeqSlice(seq=r.seq, start=0, n=len(ctx), logits="last"))
            else:
                slices.append(P.SeqSlice(seq=r.seq, start=0, n=len(ctx), logits="sample", draw=r.draw(len(r.generated))))
            ids += ctx
        try:
            out = await self._step(slices, ids, False)
        except StepFailed as e:
            for r in reqs:
                self._fail(r, f"prefill failed: {e}")
            return
        self._last_out = None  # the next decode step follows a prefill, not a decode step
        # the reply's rows: `tokens` (and their logprobs) one per "sample" slice, `logits` those of
        # the "all" and "last" slices, both in slice order
        sampled, logits, row = 0, out.tensors["logits"], 0
        for r, s in zip(reqs, slices):
            self.running[r.seq] = r
            replay = bool(r.generated)
            self.stats["replayed_tokens" if replay else "prompt_tokens"] += len(r.prompt_ids) + len(r.generated)
            if s.logits in ("all", "last"):
                n = s.n if s.logits == "all" else 1
                rows, row = logits[row : row + n], row + n
                for c in [r, *self._fork(r)]:
                    picked = pick(rows[-1:], [c.draw(0)])
                    self._emit(c, int(picked["tokens"][0]), rows if c.prompt_logits else None, _logprobs(c, picked, 0))
            else:
                self._emit(r, int(out.tensors["tokens"][sampled]), None, _logprobs(r, out.tensors, sampled))
                sampled += 1

    def _fork(self, req: Request) -> list[Request]:
        """Copy the prefilled request's cache to its other choices, which then run beside it."""
        forks, req.forks = [r for r in req.forks if not r.finished], []
        if forks:
            self.head.send_multipart(P.encode(P.Fork(seq=req.seq, into=[r.seq for r in forks])))
            for r in forks:
                r.t_prefill, r.leader = req.t_prefill, None
                self.running[r.seq] = r
        return forks

    async def _decode(self) -> None:
        """Take one decode step's tokens, for every running request together. With a single stage
        the next step leaves before this one's reply is awaited, its tokens left to the stage's own
        samples (-1, shared/protocol.py: Step), so the messages' latency and this loop's work overlap
        the stage's step rather than add to it. A request that ends on a sampled EOS or stop has one
        such step in flight: its token is dropped, as is its cache with the Free that follows."""
        if not self._inflight:
            self._send_decode()
        if len(self.opts.devices) == 1 and not self.waiting:
            self._send_decode()
        if not self._inflight:
            return
        batch, fut = self._inflight.popleft()
        try:
            out, t_arrived = await fut
        except StepFailed as e:
            for r in batch:
                r.pending -= 1
                self._fail(r, f"decode failed: {e}")
            return
        st = self.stats
        if self._last_out is not None:
            st["decode_steps"] += 1
            # the worker's time on this step from when it had both the step and its previous
            # reply out (a step it took while the previous one ran waited behind it)
            st["decode_worker_s"] += out.t_out - max(out.t_in, self._last_out)
            st["decode_between_s"] += max(0.0, out.t_in - self._last_out)
        self._last_out = out.t_out
        for i, (r, tok) in enumerate(zip(batch, out.tensors["tokens"].tolist())):
            r.pending -= 1
            if not r.finished:
                self._emit(r, tok, None, _logprobs(r, out.tensors, i))

    def _send_decode(self) -> None:
        """Send a decode step for the running requests that may still grow; each feeds the token
        it generated last, or -1 when a step in flight will sample that one."""
        batch = [r for r in self.running.values() if len(r.generated) + r.pending < r.max_new][: self.opts.max_batch]
        if not batch:
            return
        slices = [P.SeqSlice(seq=r.seq, start=r.pos + r.pending, n=1, logits="sample",
                             draw=r.draw(len(r.generated) + r.pending)) for r in batch]
        fut = self._send(slices, [-1 if r.pending else r.generated[-1] for r in batch], True)
        for r in batch:
            r.pending += 1
        self._inflight.append((batch, fut))

    def _emit(self, req: Request, tok: int, prompt_logits: torch.Tensor | None, lp: P.TokenLogprobs | None) -> None:
        now = time.perf_counter()
        if not req.generated:
            req.t_first = now
            self.metrics.ttft.observe(now - req.t_arrive)
        else:
            self.metrics.itl.observe(now - req.t_last)
        req.t_last = now
        req.generated.append(tok)
        req.ahead.popleft()
        self.stats["generated_tokens"] += 1
        p = req.params
        reason = None
        if not p.ignore_eos and tok in self.eos:
            reason = "eos"
        elif tok in p.stop_token_ids:
            reason = "stop"
        else:
            req.text += req.detok.add([tok])
        if reason is None and p.stop:
            for s in p.stop:
                k = req.text.find(s, max(0, req.sent - len(s)))
                if k >= 0:
                    req.text, reason = req.text[:k], "stop"
                    break
        if reason is None and len(req.generated) >= req.max_new:
            reason = "length"
            req.text += req.detok.flush()
        # Hold back text that could still become the start of a stop string.
        hold = 0 if reason else max((len(s) - 1 for s in p.stop), default=0)
        upto = max(req.sent, len(req.text) - hold)
        msg = P.Tokens(id=req.id, token_ids=[tok], text=req.text[req.sent : upto], logprobs=None if lp is None else [lp])
        req.sent = upto
        if prompt_logits is not None:
            msg.tensors = {"prompt_logits": prompt_logits}
        req.events.put_nowait(msg)
        if reason:
            self._finish(req, reason)

    def _finish(self, req: Request, reason: str) -> None:
        if req.finished:
            return
        req.finished = True
        n = len(req.generated)
        prefill_s = (req.t_first - req.t_prefill) if n else 0.0
        req.events.put_nowait(P.Done(
            id=req.id, finish_reason=reason, prompt_tokens=len(req.prompt_ids), completion_tokens=n,
            ttft_s=(req.t_first - req.t_arrive) if n else 0.0,
            prefill_tok_s=len(req.prompt_ids) / prefill_s if prefill_s > 0 else 0.0,
            decode_tok_s=(n - 1) / (req.t_last - req.t_first) if n > 1 and req.t_last > req.t_first else 0.0,
        ))
        self.stats["completed"] += 1
        self.metrics.finished(req.frontend, reason)
        self._release(req)
        for r in req.forks:  # choices that never had their prefill end with it
            self._finish(r, reason)

    def _fail(self, req: Request, message: str) -> None:
        if req.finished:
            return
        req.finished = True
        req.events.put_nowait(P.Error(id=req.id, message=message))
        self.stats["errors"] += 1
        self.metrics.finished(req.frontend, "error")
        self._release(req)
        for r in req.forks:
            self._fail(r, message)

    def _release(self, req: Request) -> None:
        self.requests.pop(req.id, None)
        if self.draining and not self.requests:
            self._drained.set()
        if req in self.waiting:
            self.waiting.remove(req)
        was_running = self.running.pop(req.seq, None) is not None
        if (was_running or req.t_prefill) and self.head is not None and self._fatal is None and not self.restarting \
                and not self.closed:
            # zmq.asyncio sends return a future that completes by itself; nothing to await here
            asyncio.ensure_future(self.head.send_multipart(P.encode(P.Free(seqs=[req.seq]))))

    # --- status and shutdown -----------------------------------------------------------------
    def health(self) -> P.HealthReply:
        status = "down" if self._fatal else "draining" if self.draining else "restarting" if self.restarting else "ok"
        hosts = self.group.status() if isinstance(self.group, HostGroup) else []
        return P.HealthReply(status=status, model=self.model_dir, workers=self.workers, hosts=hosts)

    async def stats_reply(self) -> P.StatsReply:
        """The engine's counters, under "workers" what each worker reported at start (its strategies,
        VRAM plan and hot experts, kept current by its worker_info messages), and under "cpu_pool"
        each pool process's own counters (its pinned cores, calls, tokens and the largest batch M it
        ran: the evidence of decode batching)."""
        pools = []
        async with self._pool_lock:
            for s in self.pool_ctl:
                await s.send_multipart(P.encode(P.Stats()))
            for s in self.pool_ctl:
                try:  # a dead pool process never answers; the front end must not wait on it
                    reply = P.decode(await asyncio.wait_for(s.recv_multipart(), 5.0))
                except asyncio.TimeoutError:
                    continue
                if isinstance(reply, P.StatsReply):
                    pools.append(reply.stats)
        return P.StatsReply(stats={**self.stats, "running": len(self.running), "waiting": len(self.waiting),
                                   "workers": self.workers, "cpu_pool": pools})

    async def drain(self, timeout_s: float) -> int:
        """Take no new requests, let those taken (running or queued) finish for at most `timeout_s`,
        then end the rest with an error that says they were cut. Returns how many were cut."""
        self.draining = True
        if self.requests:
            try:
                await asyncio.wait_for(self._drained.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        cut = len(self.requests)
        self.fail_all(f"cut: the service stopped before this request finished (--drain-timeout {timeout_s:g} s)")
        return cut

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for t in [*self._tasks, self._reader_task]:
            if t is not None:
                t.cancel()
        self.fail_all("service is shutting down")
        try:
            if self.head is not None:
                await self.head.send_multipart(P.encode(P.Shutdown()))
                for s in self.pool_ctl:
                    await s.send_multipart(P.encode(P.Shutdown()))
            # workers that never all started were sent no Shutdown (nothing connects them yet):
            # waiting for them to end on their own would only delay the start error by the grace
            grace = 5.0 if self.head is not None else 0.0
            await asyncio.get_running_loop().run_in_executor(None, self.group.stop, grace)
        finally:
            self.group.kill_all()
            if self.prestarted is None:  # else the command's, which its later engines may use
                self.stores.close()
            if hasattr(self, "ctx"):
                self.curve.close()
                self.ctx.destroy(linger=0)
