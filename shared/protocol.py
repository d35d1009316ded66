"""Every message that crosses a process boundary, declared once.

A message on the wire is a ZeroMQ multipart: frame 0 is a msgpack map (the header), frames 1..n are
raw tensor bytes, described in the header's ``tensors`` list (name, dtype, shape) in frame order.
Tensors never go through msgpack, so a [T, hidden] activation is sent and received without a copy
into or out of a serialiser, and nothing is ever unpickled.

Each message type is a dataclass here; ``encode``/``decode`` check the version, the type name, the
field names and the field types, so a malformed peer gets a one-line ``ProtocolError`` naming the
problem rather than a KeyError deep in a worker. docs/protocol.md documents the same set.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack
import numpy as np

if typing.TYPE_CHECKING:
    import torch

PROTOCOL_VERSION = 3  # 2: host agents (attach, host_info, assign, heartbeat, host_fault), health's hosts;
# logprobs (SamplingParams, Tokens, Draw, Logits), Fork; 3: worker_info


class ProtocolError(ValueError):
    """A message that cannot be accepted; the text names the problem."""


# --- tensor frames -------------------------------------------------------------------------------

# A dtype's name on the wire -> the numpy dtype its bytes are read as. bfloat16 has none: its bytes
# travel as int16's.
_WIRE_DTYPES = {"float32": np.float32, "bfloat16": np.int16, "float16": np.float16, "int64": np.int64,
                "int32": np.int32, "int16": np.int16, "uint8": np.uint8, "int8": np.int8}


def tensor_frame(t: torch.Tensor | np.ndarray) -> tuple[dict, memoryview]:
    """Describe a CPU tensor (or numpy array) and expose its bytes without copying (a tensor that
    is not contiguous, or not on the CPU, is copied once)."""
    numpy = isinstance(t, np.ndarray)
    name = t.dtype.name if numpy else str(t.dtype).removeprefix("torch.")
    if name not in _WIRE_DTYPES:
        raise ProtocolError(f"tensor dtype {name} cannot travel")
    if numpy:
        arr = np.ascontiguousarray(t)
    else:
        t = t.detach().cpu().contiguous()
        arr = (t.view(_torch().int16) if name == "bfloat16" else t).numpy()
    buf = memoryview(arr).cast("B") if arr.size else memoryview(b"")
    return {"dtype": name, "shape": list(arr.shape)}, buf


def frame_tensor(desc: dict, frame: bytes | memoryview, numpy: bool = False) -> torch.Tensor | np.ndarray:
    """A frame as a torch tensor, or with `numpy` as a numpy array (bfloat16 widened to float32,
    exactly), for processes that do not load torch (shared/client.py)."""
    try:
        name = desc["dtype"]
        bits = np.dtype(_WIRE_DTYPES[name])
        shape = [int(s) for s in desc["shape"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ProtocolError(f"bad tensor descriptor {desc!r}") from e
    nbytes = int(np.prod(shape, dtype=np.int64)) * bits.itemsize
    if len(frame) != nbytes:
        raise ProtocolError(f"tensor frame has {len(frame)} bytes, descriptor {desc!r} needs {nbytes}")
    torch = None if numpy else _torch()
    if nbytes == 0:
        if numpy:
            return np.empty(shape, np.float32 if name == "bfloat16" else bits)
        return torch.empty(shape, dtype=getattr(torch, name))
    # frombuffer on a read-only zmq frame: torch warns about non-writable memory; copy only if needed.
    arr = np.frombuffer(frame, dtype=np.uint8)
    arr = arr.copy() if not arr.flags.writeable else arr
    if numpy:
        a = arr.view(bits).reshape(shape)
        return (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32) if name == "bfloat16" else a
    return torch.from_numpy(arr).view(getattr(torch, name)).reshape(shape)


@functools.cache
def _torch():
    """torch, imported where a tensor is made: the client (shared/client.py) never loads it."""
    import torch

    return torch


# --- messages ------------------------------------------------------------------------------------

_REGISTRY: dict[str, type[Message]] = {}


@dataclass
class Message:
    TYPE: ClassVar[str] = ""
    # Tensors carried as frames, by name; not part of the msgpack header. torch tensors, or numpy
    # arrays where decoded with numpy=True.
    tensors: dict[str, Any] = field(default_factory=dict, kw_only=True)

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.TYPE:
            _REGISTRY[cls.TYPE] = cls


@functools.cache
def _parts(annotation: Any) -> tuple:
    return typing.get_origin(annotation), typing.get_args(annotation)


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    """Validate a decoded msgpack value against a dataclass annotation (the subset we use)."""
    origin, args = _parts(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        if len(others) == 1:  # Optional[X]: report X's own, more precise, complaint
            return _check_type(value, others[0], where)
        for a in args:
            try:
                return _check_type(value, a, where)
            except ProtocolError:
                pass
        raise ProtocolError(f"{where}: {value!r} is not {annotation}")
    if annotation is type(None):
        if value is not None:
            raise ProtocolError(f"{where}: expected null")
        return None
    if origin is list:
        if not isinstance(value, list):
            raise ProtocolError(f"{where}: expected a list, got {type(value).__name__}")
        return [_check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected a map, got {type(value).__name__}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProtocolError(f"{where}: expected a number, got {type(value).__name__}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProtocolError(f"{where}: expected an integer, got {type(value).__name__}")
        return value
    if annotation in (str, bool, bytes):
        if not isinstance(value, annotation) or (annotation is not bool and isinstance(value, bool)):
            raise ProtocolError(f"{where}: expected {annotation.__name__}, got {type(value).__name__}")
        return value
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected a map")
        return _from_fields(annotation, value, where)
    return value


@functools.cache
def _schema(cls) -> tuple[frozenset, tuple]:
    """A message class's field names and (name, annotation, required) per field, once per class:
    resolving the annotations took ~100 us a dataclass, and a 32-sequence decode step holds 64."""
    hints = typing.get_type_hints(cls)
    fields = tuple((f.name, hints[f.name], f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
                   for f in dataclasses.fields(cls) if f.name != "tensors")
    return frozenset(name for name, _, _ in fields), fields


def _from_fields(cls, data: dict, where: str):
    names, fields = _schema(cls)
    kwargs = {}
    unknown = data.keys() - names
    if unknown:
        raise ProtocolError(f"{where}: unknown field(s) {sorted(unknown)}")
    for name, annotation, required in fields:
        if name in data:
            kwargs[name] = _check_type(data[name], annotation, f"{where}.{name}")
        elif required:
            raise ProtocolError(f"{where}: missing field '{name}'")
    return cls(**kwargs)


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name != "tensors"}
    if isinstance(obj, list):
        return [_to_plain(v) for v in obj]
    return obj


def encode(msg: Message) -> list:
    """Message -> multipart frames."""
    header = _to_plain(msg)
    header["v"] = PROTOCOL_VERSION
    header["type"] = msg.TYPE
    descs, frames = [], []
    for name, t in msg.tensors.items():
        desc, buf = tensor_frame(t)
        desc["name"] = name
        descs.append(desc)
        frames.append(buf)
    if descs:
        header["tensors"] = descs
    return [msgpack.packb(header, use_bin_type=True), *frames]


def decode(frames: list, numpy: bool = False) -> Message:
    """Multipart frames -> Message, or ProtocolError naming what is wrong. Its tensors are torch
    tensors, or with `numpy` numpy arrays (frame_tensor)."""
    if not frames:
        raise ProtocolError("empty message")
    try:
        header = msgpack.unpackb(bytes(frames[0]), raw=False)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"header is not valid msgpack ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise ProtocolError("header must be a msgpack map")
    v = header.pop("v", None)
    if v != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {v!r} not supported (this server speaks {PROTOCOL_VERSION})")
    mtype = header.pop("type", None)
    cls = _REGISTRY.get(mtype) if isinstance(mtype, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {mtype!r}")
    descs = header.pop("tensors", [])
    if not isinstance(descs, list) or len(descs) != len(frames) - 1:
        raise ProtocolError(f"{mtype}: {len(frames) - 1} tensor frame(s) but {len(descs) if isinstance(descs, list) else '?'} descriptor(s)")
    msg = _from_fields(cls, header, mtype)
    for desc, frame in zip(descs, frames[1:]):
        if not isinstance(desc, dict) or not isinstance(desc.get("name"), str):
            raise ProtocolError(f"{mtype}: bad tensor descriptor {desc!r}")
        msg.tensors[desc["name"]] = frame_tensor(desc, frame.buffer if hasattr(frame, "buffer") else frame, numpy)
    return msg


# === client <-> coordinator (documented in docs/protocol.md) =====================================


MAX_LOGPROBS = 20  # most alternatives per token, as OpenAI's top_logprobs


@dataclass
class SamplingParams:
    max_new_tokens: int | None = 256  # None: up to --max-context
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # Return each generated token's log-probability and those of the `logprobs` likeliest tokens at
    # its position (0: the chosen token's alone; None: nothing); shared/sampling.py: logprobs.
    logprobs: int | None = None

    def validate(self) -> None:
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ProtocolError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ProtocolError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ProtocolError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ProtocolError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ProtocolError("stop strings must be non-empty")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ProtocolError(f"logprobs must be in 0..{MAX_LOGPROBS}, got {self.logprobs}")


@dataclass
class Generate(Message):
    """Start a request. Exactly one of prompt, prompt_ids, messages."""

    TYPE: ClassVar[str] = "generate"
    id: str
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    messages: list[dict] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # Return the logits of every prompt position (float32 [L, vocab]) with the first token: used by
    # exactness checks and teacher-forced evaluation.
    prompt_logits: bool = False

    def validate(self) -> None:
        given = [x is not None for x in (self.prompt, self.prompt_ids, self.messages)]
        if sum(given) != 1:
            raise ProtocolError("generate needs exactly one of prompt, prompt_ids, messages")
        if self.prompt_ids is not None and not self.prompt_ids:
            raise ProtocolError("prompt_ids is empty")
        if self.messages is not None:
            for i, m in enumerate(self.messages):
                if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                    raise ProtocolError(f"messages[{i}] must be a map with 'role' and 'content'")
        self.sampling.validate()


@dataclass
class Cancel(Message):
    TYPE: ClassVar[str] = "cancel"
    id: str


@dataclass
class Health(Message):
    TYPE: ClassVar[str] = "health"


@dataclass
class Stats(Message):
    TYPE: ClassVar[str] = "stats"


@dataclass
class Tokens(Message):
    """Streamed: new tokens of request `id` and the text they complete (may be empty while a
    multi-byte character is still incomplete)."""

    TYPE: ClassVar[str] = "tokens"
    id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprobs] | None = None  # one per token_ids entry, when sampling.logprobs is set


@dataclass
class TokenLogprobs:
    """A generated token's log-probability under the model (the log-softmax of its float32 logits,
    before temperature, top-k and top-p), and the likeliest tokens at its position, best first."""

    logprob: float
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)


@dataclass
class Done(Message):
    TYPE: ClassVar[str] = "done"
    id: str
    finish_reason: str  # "length" | "stop" | "eos" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    prefill_tok_s: float
    decode_tok_s: float


@dataclass
class Error(Message):
    TYPE: ClassVar[str] = "error"
    message: str
    id: str | None = None


@dataclass
class HealthReply(Message):
    TYPE: ClassVar[str] = "health_reply"
    status: str  # ok | restarting | draining | down (docs/protocol.md); anything but ok: not serving now
    model: str
    workers: list[dict]
    hosts: list[dict] = field(default_factory=list)  # with --hosts: each agent's endpoint, name and state


@dataclass
class StatsReply(Message):
    TYPE: ClassVar[str] = "stats_reply"
    stats: dict


# === coordinator <-> gpu workers <-> cpu pool (internal) ==========================================


@dataclass
class Draw:
    """How the last stage picks a slice's next token (shared/sampling.py): the request's settings and
    u, a uniform number in [0, 1) the coordinator drew from the request's seeded generator."""

    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0
    top_p: float = 1.0
    u: float = 0.0
    logprobs: int | None = None  # SamplingParams.logprobs: reply with the token's log-probability and the top N


@dataclass
class SeqSlice:
    """One sequence's share of a step: tokens [start, start + n) of sequence `seq`."""

    seq: int
    start: int
    n: int
    # what the last stage returns for the slice: "sample" its next token, drawn as `draw` says;
    # "last" or "all" its logits rows; "none" nothing (a stage's own non-final chunk of a prompt)
    logits: str = "last"
    draw: Draw | None = None


@dataclass
class Step(Message):
    """A forward pass over the listed slices, concatenated in order. Rank 0 receives tensor
    `tokens` (int64 [T]); later ranks receive `hidden` ([T, hidden_size]). With a single stage, a
    one-token slice's token may be -1: the token that stage sampled last for the sequence, which
    the coordinator has not seen yet (it sends a decode step before the previous one's reply)."""

    TYPE: ClassVar[str] = "step"
    step: int
    slices: list[SeqSlice]
    decode: bool  # routed experts on the CPU pool (decode) or on the GPU worker (prefill)


@dataclass
class Logits(Message):
    """Last rank -> coordinator: tensor `tokens` int64 [S], the tokens drawn for the step's "sample"
    slices in order, and tensor `logits` float32 [R, vocab], the rows its "last" and "all" slices
    asked for in order. `t_in`, `t_out`: the last rank's time.monotonic() (a clock every process of
    one host shares) when the step arrived and when this reply left, for the coordinator's account
    of where a step's time goes."""

    TYPE: ClassVar[str] = "logits"
    step: int
    t_in: float
    t_out: float


@dataclass
class Free(Message):
    """Drop these sequences' KV caches; travels the pipeline like a step."""

    TYPE: ClassVar[str] = "free"
    seqs: list[int]


@dataclass
class Fork(Message):
    """Copy sequence `seq`'s KV cache (and recurrent state) into each of `into`: choices of one
    prompt (n > 1) share its prefill; travels the pipeline like a step."""

    TYPE: ClassVar[str] = "fork"
    seq: int
    into: list[int]


@dataclass
class Shutdown(Message):
    TYPE: ClassVar[str] = "shutdown"


@dataclass
class Ready(Message):
    """A worker finished loading. `info` reports what it holds (layers, memory)."""

    TYPE: ClassVar[str] = "ready"
    role: str  # "gpu" | "cpu"
    rank: int
    pid: int
    info: dict


@dataclass
class WorkerInfo(Message):
    """Part of what a worker reported in `ready` changed while it serves: a GPU worker's hot set,
    built from the first prompt's counts where none were saved, the layers it then decodes on its
    device, and its decode route's choices (its Ready info's keys, with their new values)."""

    TYPE: ClassVar[str] = "worker_info"
    role: str
    rank: int
    info: dict


@dataclass
class WorkerError(Message):
    """A worker could not do `step` (or failed to start when step is -1); it keeps serving."""

    TYPE: ClassVar[str] = "worker_error"
    role: str
    rank: int
    step: int
    message: str


@dataclass
class Progress(Message):
    """A worker's loading progress, shown by the coordinator as one bar: `done` of `total` units
    (tensors or layers) of `what`."""

    TYPE: ClassVar[str] = "progress"
    role: str
    rank: int
    what: str
    done: int
    total: int


# === coordinator <-> host agents (docs/protocol.md: Host agents) ==================================


@dataclass
class Attach(Message):
    """Coordinator -> agent: serve me (whatever the agent ran before is stopped). The agent stops its
    workers when it hears nothing from the coordinator for 3 x `heartbeat_s`."""

    TYPE: ClassVar[str] = "attach"
    heartbeat_s: float


@dataclass
class HostInfo(Message):
    """Agent -> coordinator, the answer to attach: its machine's name, its devices (one stage each,
    in order), how many CPU pool processes it will start, and its pid."""

    TYPE: ClassVar[str] = "host_info"
    host: str
    devices: list[str]
    pools: int
    pid: int


@dataclass
class Assign(Message):
    """Coordinator -> agent: run stages `ranks` (consecutive) of the plan `layers` ([a, b) per stage
    of the whole pipeline) of `model`, with `options` (coordinator/processes.py RuntimeOptions, less
    what the agent decides: devices, pool size, NUMA) and the GPU workers' `strategy` settings. The
    agent's last stage sends to `next`, the next host's stage endpoint, or, for the pipeline's last
    stage, the agent's results endpoint."""

    TYPE: ClassVar[str] = "assign"
    model: str
    ranks: list[int]
    layers: list[list[int]]
    options: dict
    strategy: dict
    next: str


@dataclass
class Heartbeat(Message):
    """Coordinator -> agent every heartbeat_s, answered with the same; either side counts the other
    lost after 3 x heartbeat_s of silence."""

    TYPE: ClassVar[str] = "heartbeat"


@dataclass
class HostFault(Message):
    """Agent -> coordinator: one of its workers died (the agent has stopped the rest)."""

    TYPE: ClassVar[str] = "host_fault"
    message: str
