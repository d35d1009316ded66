"""Builds and loads the C layer kernel (expert_kernel.c) and the pool's decode loop around it
(decode_loop.c, which includes it) with the system C compiler at first use.

Built at first use rather than at install time because it is compiled for the CPU it runs on
(-march=native: AVX-512 on the pool's hosts, AVX2 on smaller machines), and a pip wheel cannot know
that. The shared library is cached under ~/.cache/krasis/kernels, named by a hash of the source,
the compiler (path and version), the flags and the CPU, so a new source, compiler or machine gets
its own build; each build is written to a temporary file and renamed into place, so pool processes
starting together never load a half-written library (each may compile, one rename wins).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

SOURCE = Path(__file__).with_name("decode_loop.c")
INCLUDED = (Path(__file__).with_name("expert_kernel.c"),)  # what SOURCE includes: part of the build's key
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
CACHE = Path.home() / ".cache" / "krasis" / "kernels"
ACTS = {"silu": 0, "gptoss": 1}


class BuildError(RuntimeError):
    pass


def _cpu() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return os.uname().machine
    return "\n".join(next((l for l in lines if l.startswith(k)), "") for k in ("model name", "flags"))


def build(extra_flags: tuple[str, ...] = (), cache: Path | None = None) -> Path:
    """The path of the built library (compiled now unless cached) in `cache` (default CACHE).
    `extra_flags` go after FLAGS (the benchmark uses them to try -D settings of the source)."""
    cache = CACHE if cache is None else cache
    names = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc"]
    cc = next((n for n in names if shutil.which(n)), None)
    if cc is None:
        raise BuildError(f"no C compiler ({' or '.join(map(repr, names))} is not on PATH)")
    compiler = shutil.which(cc)
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    flags = (*FLAGS, *extra_flags)
    sources = [p.read_text() for p in (SOURCE, *INCLUDED)]
    key = hashlib.sha256("\0".join([*sources, compiler, version, *flags, _cpu()]).encode()).hexdigest()[:16]
    out = cache / f"expert_kernel-{key}.so"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=cache)
    os.close(fd)
    try:
        r = subprocess.run([compiler, *flags, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True, timeout=600)
        if r.returncode:
            errors = [l for l in r.stderr.splitlines() if "error" in l] or r.stderr.splitlines() or [f"exit code {r.returncode}"]
            raise BuildError(f"{cc} failed on {SOURCE.name}: {errors[0].strip()}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


_i, _p, _i64 = ctypes.c_int, ctypes.c_void_p, ctypes.c_int64


class Block(ctypes.Structure):
    """expert_kernel.c's block_t: a bound block of experts."""
    _fields_ = [*((n, _i) for n in ("bits", "act", "nthreads", "H", "I", "G13", "G2")), ("first", _i64), ("count", _i64),
                *((n, _p) for n in ("q13", "s13", "q2", "s2", "b13", "b2"))]


class Tokens(ctypes.Structure):
    """expert_kernel.c's tokens_t: a call's token buffers."""
    _fields_ = [("M", _i), ("topk", _i), ("xbf16", _i), *((n, _p) for n in ("x", "ids", "weights", "out"))]


class Ahead(ctypes.Structure):
    """expert_kernel.c's ahead_t: the lookahead's router, stop conditions and guess."""
    _fields_ = [("router", _p), ("bias", _p), ("E", _i), ("nwords", _i), ("words", _p), ("seen", _p),
                ("max_s", ctypes.c_double), ("budget", _i64), ("predicted", _p), ("allowed", _p), ("experts", _i)]


# krasis_clock's sums, in its order (expert_kernel.c: CLK_*): the layer kernel's calls, from a call's
# start to its last thread's start, to phase 1's first and last thread's end, phase 2 after phase 1's
# last; the lookahead's calls, its last thread's start and its guess
CLOCK = ("calls", "wake_s", "p1_first_s", "p1_last_s", "p2_s", "ahead_calls", "ahead_wake_s", "ahead_guess_s")

# krasis_loop's counters, in its order (decode_loop.c: S_*)
LOOP_STATS = ("calls", "tokens", "pairs", "max_m", "kernel_s", "serve_s", "gap_s", "gaps", "step_gap_s", "step_gaps",
              "step_kernel_s", "after_s", "lookahead_calls", "lookahead_bytes", "lookahead_skipped", "guessed", "chosen",
              "posted")


class SlotParts(ctypes.Structure):
    """decode_loop.c's slot_t: a mailbox slot's header and parts."""
    _fields_ = [(n, _p) for n in ("hdr", "x", "ids", "weights", "out", "guess")]


class Loop(ctypes.Structure):
    """decode_loop.c's loop_t (cpu_worker/decode_loop.py fills it)."""
    _fields_ = [*((n, _i) for n in ("nslots", "nlayers", "max_m", "topk")),
                *((n, _p) for n in ("slots", "words", "seen", "blocks", "routers", "next", "previous", "experts", "last",
                                    "asked", "empty", "skip", "allowed", "guess")),
                ("pending", _i), ("last_layer", _i), ("budget", _i64), ("quiet", _i64), ("empty_max", _i), ("skip_n", _i),
                ("hold_s", ctypes.c_double), ("idle_s", ctypes.c_double), ("answered", ctypes.c_double),
                ("stats", ctypes.c_double * len(LOOP_STATS))]


class CKernel:
    """The loaded library's krasis_moe_layer and krasis_lookahead (and its clock, pinning and hold:
    `clock`, `pin`, `bind_hold`; `loop` is krasis_loop, which decode_loop.py binds). `bind` checks a block of experts
    once and returns the call for it, which checks a call's buffers only when they are not the ones
    it was last given (the pool's slot views are the same tensors every step) and passes its
    arguments as structs filled then: its per-call Python work is a couple of microseconds, against
    a layer's ~0.25 ms, once per layer of every decode step."""

    def __init__(self, path: Path):
        lib = ctypes.CDLL(str(path))
        self.fn, self.ahead = lib.krasis_moe_layer, lib.krasis_lookahead
        self.fn.argtypes, self.fn.restype = [_p, _p], _i
        self.ahead.argtypes, self.ahead.restype = [_p, _p, _p], _i64
        self._clock = lib.krasis_clock
        self._clock.argtypes, self._clock.restype = [_p, _p, _p, _i], _i
        self._pin = lib.krasis_pin
        self._pin.argtypes, self._pin.restype = [_p, _i], _i
        self._hold = lib.krasis_hold
        self._hold.argtypes, self._hold.restype = [_p, _p, _i, ctypes.c_double, _i], _i
        self.loop = lib.krasis_loop
        self.loop.argtypes, self.loop.restype = [_p, ctypes.c_double, ctypes.c_double], _i
        # INT4 with bf16 x runs the Q8 path (int8 activations), on 1: vpdpbusd (AVX512-VNNI),
        # 2: vpmaddubsw (AVX2, or AVX-512 without VNNI)
        self.int4_q8 = ctypes.c_int.in_dll(lib, "krasis_int4_q8").value

    def clock(self, threads: int = 256) -> dict:
        """Where the kernels' time went since the last read (CLOCK's sums), then zeroed; with the layer
        kernel's phase 1 of each thread of its team summed (`p1_by_thread_s`) and the CPU each last
        ran it on (`cpu_by_thread`)."""
        sums, p1, cpu = (ctypes.c_double * len(CLOCK))(), (ctypes.c_double * threads)(), (ctypes.c_int * threads)()
        team = min(self._clock(sums, p1, cpu, threads), threads)
        return {**dict(zip(CLOCK, sums)), "p1_by_thread_s": list(p1[:team]), "cpu_by_thread": list(cpu[:team])}

    def bind_hold(self, words: np.ndarray, seen: np.ndarray, threads: int):
        """hold(max_s) -> whether a request came: krasis_hold on `threads` threads until a word at the
        addresses `words` differs from `seen` (int64 arrays of one length, kept by the caller and read
        at each call) or max_s seconds pass."""
        if len(words) != len(seen) or words.dtype != np.int64 or seen.dtype != np.int64:
            raise ValueError("words and seen must be int64 arrays of one length")
        fn, w, s, n = self._hold, words.ctypes.data, seen.ctypes.data, len(words)

        def hold(max_s: float) -> bool:
            return bool(fn(w, s, n, max_s, threads))

        hold.keep = (words, seen)
        return hold

    def pin(self, cpus: list[int]) -> None:
        """Pin the kernels' team of len(cpus) threads, thread i to cpus[i] (the caller is thread 0)."""
        arr = (ctypes.c_int * len(cpus))(*cpus)
        failed = self._pin(arr, len(cpus))
        if failed:
            raise OSError(f"{failed} of the C kernel's {len(cpus)} threads could not be pinned to {cpus}")

    @staticmethod
    def _block(t: dict[str, torch.Tensor], bits: int, first: int, count: int, act: str, threads: int) -> Block | None:
        """The block_t of a block of experts' tensors, checked to fit together (the tensors it points
        into are kept on it as `held`); None where the kernel does not apply: an INT4 group that ends
        inside a byte."""
        q13, s13, q2, s2 = t["w13.q"], t["w13.s"], t["w2.q"], t["w2.s"]
        n, rows13, row13 = q13.shape
        _, hidden, row2 = q2.shape
        g13, g2 = s13.shape[2], s2.shape[2]
        if row13 % g13 or row2 % g2:
            return None
        inter, per_byte = rows13 // 2, 8 // bits
        if not (
            hidden == row13 * per_byte and row2 * per_byte == inter and s13.shape[:2] == (n, rows13)
            and s2.shape[:2] == (n, hidden) and 0 <= count <= n
            and q13.is_contiguous() and s13.is_contiguous() and q2.is_contiguous() and s2.is_contiguous()
        ):
            raise ValueError(f"expert tensors {[list(v.shape) for v in (q13, s13, q2, s2)]} do not fit together")
        b13, b2 = t.get("b13"), t.get("b2")
        if b13 is not None and (b13.shape != (n, rows13) or b2.shape != (n, hidden)):
            raise ValueError(f"expert biases {list(b13.shape)}, {list(b2.shape)} do not fit the weights")
        held = [q13, s13, q2, s2, *(None if b is None else b.contiguous() for b in (b13, b2))]
        block = Block(bits, ACTS[act], threads, hidden, inter, g13, g2, first, count,
                      *(None if h is None else h.data_ptr() for h in held))
        block.held = held
        return block

    @staticmethod
    def _tokens(x: torch.Tensor, m: int, k: int, hidden: int, **rest: torch.Tensor) -> Tokens:
        """The tokens_t of a call's buffers, each checked first: what a wrong pointer would corrupt
        memory with."""
        if x.shape != (m, hidden) or x.dtype not in (torch.bfloat16, torch.float32) or not x.is_contiguous():
            raise ValueError(f"x {list(x.shape)} {x.dtype} does not fit {m} tokens of experts of hidden size {hidden}")
        for name, (t, shape, dtype) in rest.items():
            if t.shape != shape or t.dtype != dtype or not t.is_contiguous():
                raise ValueError(f"{name} {list(t.shape)} {t.dtype} is not a contiguous {list(shape)} {dtype}")
        return Tokens(m, k, x.dtype == torch.bfloat16, x.data_ptr(), *(rest[n][0].data_ptr() if n in rest else None
                                                                       for n in ("ids", "weights", "out")))

    def bind(self, t: dict[str, torch.Tensor], bits: int, first: int, count: int, act: str, threads: int):
        """run(x, ids, weights, out) for experts [first, first + count) whose tensors are `t`: writes
        the float32 partial sum of x [M, H] (bf16 or float32) into out (float32 [M, H], contiguous),
        ids int32 and weights float32 [M, k] as the mailbox slot holds them, and returns how many
        (token, choice) pairs were the block's. None where the kernel does not apply: an INT4 group
        that ends inside a byte."""
        block = self._block(t, bits, first, count, act, threads)
        if block is None:
            return None
        fn, b_ptr, hidden = self.fn, ctypes.addressof(block), block.H
        last: list = [None, None, None]  # the buffers last checked, their tokens_t and its address

        def run(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> int:
            bufs = (x, ids, weights, out)
            if last[0] is None or not all(a is b for a, b in zip(last[0], bufs)):
                m, k = ids.shape
                # the tensors the call points into: converted (a new tensor) where the caller's do not fit
                x = (x if x.dtype in (torch.bfloat16, torch.float32) else x.float()).contiguous()
                ids = ids.to(torch.int32).contiguous()
                weights = weights.float().contiguous()
                tokens = self._tokens(x, m, k, hidden, ids=(ids, (m, k), torch.int32),
                                      weights=(weights, (m, k), torch.float32), out=(out, (m, hidden), torch.float32))
                tokens.held = (block, x, ids, weights, out)
                # converted buffers are new tensors every call: only the caller's own are remembered
                same = all(a is b for a, b in zip(tokens.held[1:], bufs))
                last[:] = (bufs if same else None), tokens, ctypes.addressof(tokens)
            rc = fn(b_ptr, last[2])
            if rc < 0:
                raise MemoryError("the C expert kernel could not allocate its scratch buffers")
            return rc

        run.block = block  # for the decode loop (decode_loop.py), which calls the kernel itself
        return run

    @staticmethod
    def router_args(router: torch.Tensor | None, bias: torch.Tensor | None, hidden: int) -> Ahead:
        """The ahead_t of a router [E, hidden] (made bf16) and bias [E] (made float32), checked to
        fit (the tensors it points into are kept on it as `held`); without a router, one that guesses
        nothing (the caller gives the ids)."""
        if router is None:
            args = Ahead(None, None, 0)
            args.held = ()
            return args
        router = router.to(torch.bfloat16).contiguous()
        bias = None if bias is None else bias.float().contiguous()
        if router.shape[1] != hidden or (bias is not None and bias.shape != router.shape[:1]):
            raise ValueError(f"router {list(router.shape)} does not fit experts of hidden size {hidden}")
        args = Ahead(router.data_ptr(), None if bias is None else bias.data_ptr(), router.shape[0])
        args.held = (router, bias)
        return args

    def bind_lookahead(self, t: dict[str, torch.Tensor], bits: int, first: int, count: int, threads: int,
                       router: torch.Tensor | None = None, bias: torch.Tensor | None = None):
        """ahead(x, predicted, words, seen, budget, max_s, allowed) -> bytes read: krasis_lookahead
        (expert_kernel.c) on the block `t` of the NEXT layer, with that layer's router [E, H] (made
        bf16) and bias [E]: reads into this process's caches the experts that top-k(x . router + bias)
        names, writing those ids into `predicted` (int32 [M, k]); without a router, the ids already in
        `predicted`; skipping those that `allowed` (uint8 numpy array over the layer's experts, when
        given) marks 0. It stops when a word at the addresses `words` (int64 numpy array) differs from
        `seen` (same length), after max_s seconds (> 0), or at `budget` bytes. None where the kernel
        does not apply."""
        block = self._block(t, bits, first, count, "silu", threads)
        if block is None:
            return None
        hidden = block.H
        fn, b_ptr = self.ahead, ctypes.addressof(block)
        args = self.router_args(router, bias, hidden)
        a_ptr = ctypes.addressof(args)
        last: list = [None, None, None]
        # the arrays last given (the pool's are the same every call), checked and their addresses
        # taken once: numpy's .ctypes costs ~1 us each on the dev machine, ~4 on the lent hosts, and
        # this runs between the pool's answer and its first read ahead
        arrays: list = [None, None, None]

        def ahead(x: torch.Tensor, predicted: torch.Tensor, words, seen, budget: int, max_s: float = 0.0, allowed=None) -> int:
            if last[0] is None or last[0][0] is not x or last[0][1] is not predicted:
                m, k = predicted.shape
                tokens = self._tokens(x, m, k, hidden, predicted=(predicted, (m, k), torch.int32))
                tokens.held = (x, predicted)
                last[:] = tokens.held, tokens, ctypes.addressof(tokens)
                args.predicted = predicted.data_ptr()
            if words is not arrays[0] or seen is not arrays[1]:
                if len(words) != len(seen) or words.dtype != seen.dtype or words.dtype.itemsize != 8:
                    raise ValueError("words and seen must be int64 arrays of one length")
                args.nwords, args.words, args.seen = len(words), words.ctypes.data, seen.ctypes.data
                arrays[:2] = words, seen
            if allowed is not arrays[2]:
                if allowed is not None and allowed.dtype.itemsize != 1:
                    raise ValueError("allowed must be a uint8 array over the layer's experts")
                args.allowed, args.experts = (None, 0) if allowed is None else (allowed.ctypes.data, len(allowed))
                arrays[2] = allowed
            args.max_s, args.budget = max_s, budget
            rc = fn(b_ptr, last[2], a_ptr)
            if rc < 0:
                raise MemoryError("the C lookahead could not allocate its buffers")
            return rc

        ahead.keep = (block, args)  # what the structs point into
        return ahead

    def __call__(self, x, ids, weights, t, bits: int, first: int, count: int, act: str, threads: int) -> torch.Tensor | None:
        """moe_layer's contract in one call: the partial sum in x's dtype (rounded once, from
        float32), or None where `bind` does not apply."""
        run = self.bind(t, bits, first, count, act, threads)
        if run is None:
            return None
        out = torch.empty(x.shape[0], x.shape[1], dtype=torch.float32)
        run(x.contiguous(), ids, weights, out)
        return out if x.dtype == torch.float32 else out.to(x.dtype)


def load(extra_flags: tuple[str, ...] = (), cache: Path | None = None) -> CKernel:
    return CKernel(build(extra_flags, cache))
