"""Starting, watching and stopping the worker processes.

Every worker is a child of the coordinator or of its zygote (Zygote, below; with --hosts, of its
machine's host agent's zygote, or the agent's: coordinator/host_agent.py), started with a JSON spec
(below, written by coordinator/local_group.py) and the expert-store memfds as inherited descriptors.
Children set PDEATHSIG so they die with their parent, and so with the coordinator, however it ends;
the coordinator in turn stops them on any exit path (normal, signal, exception). An unexpected child
exit raises WorkerDied; the engine then restarts the whole group, or goes down past --max-restarts.

GPU worker spec: rank, world, device, dtype, model, layers [a, b), max_context, threads,
    in (its inbound endpoint), next (next stage's inbound or the coordinator's), coord,
    mailbox {fd, shape, count, slots (its slot per pool process), pool_pids} (shared/mailbox.py),
    store {nodes, fds, format, cache, gguf, filled, fill}, dense_cache, parent_pid,
    cores (empty: any; else the cores kept off the pool, coordinator/processes.py:reserve_cores),
    prefill_strategy, decode_strategy, stream_decode, resident_decode, pcie_share, vram_budget, kv_dtype, prefill_chunk,
    hcs_path
    (gpu_worker/experts.py),
    keys (CURVE keys folder for its tcp endpoints, or null: shared/keys.py).
    Its store is the CPU pool's when the GPU and CPU expert formats agree (one copy in RAM);
    otherwise a store of its own format (fill: each GPU worker fills its own layers; false where an
    earlier group filled it: KeptStores, below).
CPU worker spec: node, model, bind (its control endpoint: stats, shutdown), coord, cores, threads,
    store {nodes, fds, format, cache, gguf, layers ([a, b): the layers whose experts the store holds,
    those of this machine's stages), filled (an earlier group filled it: no fill)}, mailbox {fd, shape,
    count, slots (one per GPU worker)}, parent_pid.
    format: ExpertFormat.to_spec(); cache: the expert cache file to copy from, or null to format the
    experts from the checkpoint (16-bit): MODEL, or the GGUF file `gguf` when not null;
    dense_cache: the INT8 dense cache file or null.

A worker may also be started before its spec exists (Prestarted): forked by the coordinator's
zygote, which has the workers' modules imported (most of a worker's start), it takes its spec and
descriptors from a socket instead of its command line and inherited descriptors.
"""

from __future__ import annotations

import collections
import importlib
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..shared.lifecycle import PRESTART_MARKS, die_with_parent, name_process, run_then_exit


class WorkerDied(RuntimeError):
    pass


@dataclass
class RuntimeOptions:
    devices: list[str] = field(default_factory=lambda: ["cpu"])
    pp_layers: list[int] | None = None
    cpu_workers: int | None = None  # default: one per NUMA node
    numa_nodes: int | None = None  # simulate this many nodes
    dtype: str = "bfloat16"
    max_context: int = 4096
    max_batch: int = 32
    prefill_chunk: int = 4096
    # Weight precision (docs/quantization.md): 16 = unquantized, read from the checkpoint.
    gpu_bits: int = 16  # routed experts as the GPU workers run them (prefill)
    cpu_bits: int = 16  # routed experts in the CPU pool's shared store (decode)
    attn_bits: int = 16  # dense GPU weights: attention, shared experts, dense MLPs, lm_head
    group_size: int = 128  # expert quantization group along the input dimension
    # KiB of the next layer's likely experts each CPU pool thread reads ahead while the GPU works
    # (cpu_worker/lookahead.py); None: one core's L2, 0: off
    lookahead_kb: int | None = None
    # cores kept off the CPU pool for the GPU workers and the coordinator (processes.py:reserve_cores);
    # None: one per local GPU worker plus one, where the pool keeps three quarters of the machine
    reserved_cores: int | None = None
    cache_dir: str | None = None  # default: convert.cache_dir (MODEL/.krasis_cache, ...)
    rebuild: bool = False  # rebuild the caches even when they look current
    gguf: str | None = None  # a GGUF file the routed experts are read from instead of MODEL
    # Routed-expert strategies (docs/strategies.md); None: the winner `optimize` stored, else the defaults.
    prefill_strategy: str | None = None
    decode_strategy: str | None = None
    # A decode step's experts streamed as a prefill's when that is faster for its batch size
    # (gpu_worker/decode_route.py): auto (measured), off, always.
    stream_decode: str = "auto"
    # The layers the prefill strategy keeps in VRAM decoded there too, not by the pool: auto (on a
    # GPU), on, off (gpu_worker/decode_strategies.py: DecodeStrategy).
    resident_decode: str = "auto"
    # The share of the CPU pool's chosen experts of each decode layer that a GPU worker reads from
    # host memory over PCIe and computes itself meanwhile (gpu_worker/host_share.py); None: auto.
    pcie_share: float | None = None
    vram_budget: float | None = None  # GB per GPU; None: the device's memory
    kv_dtype: str = "auto"  # fp8 | bf16 | auto (fp8, except float32 runs keep float32)
    # Across machines (coordinator/hosts.py): the host agents' endpoints (None: every stage here,
    # on `devices`), the CURVE keys folder for tcp sockets, and the heartbeat period.
    hosts: list[str] | None = None
    keys: str | None = None
    heartbeat_s: float = 2.0


def numa_cpus(simulate: int | None) -> list[list[int]]:
    """Cores of each NUMA node that this process may run on; with `simulate`, the available cores
    split into that many groups."""
    allowed = sorted(os.sched_getaffinity(0))
    if simulate:
        k = simulate
        return [allowed[len(allowed) * i // k : len(allowed) * (i + 1) // k] or allowed for i in range(k)]
    nodes = []
    for d in sorted(Path("/sys/devices/system/node").glob("node[0-9]*")):
        try:
            cpus = _parse_cpulist((d / "cpulist").read_text())
        except OSError:
            continue
        cpus = [c for c in cpus if c in allowed]
        if cpus:
            nodes.append(cpus)
    return nodes or [allowed]


def pool_processes(opts: RuntimeOptions) -> int:
    """CPU pool processes a run on this host starts: --cpu-workers, else one per NUMA node."""
    return opts.cpu_workers or len(numa_cpus(opts.numa_nodes))


def reserve_cores(nodes: list[list[int]], gpu_workers: int, reserved: int | None = None) -> tuple[list[list[int]], list[int]]:
    """(the pool's cores per node, the cores kept for the GPU workers and the coordinator), taken
    from the end of the first node: `reserved` of them (--reserved-cores), else one per GPU worker
    plus one when that leaves the pool at least three quarters of the machine. In decode a GPU
    worker launches a layer's kernels between two pool calls; if the pool's threads (which spin a
    while after each call) share its core, every layer waits for the scheduler. The pool's decode
    kernel is bound by DRAM read, which on the lent hosts grows with the cores reading: a machine
    whose GPU workers wait without spinning may give the pool more."""
    first = nodes[0]
    if reserved is not None:
        if reserved >= len(first):
            from .plan import PlanError  # here: plan imports the model families, and with them torch

            raise PlanError(f"--reserved-cores {reserved} leaves the CPU pool none of the first NUMA node's "
                            f"{len(first)} cores")
        keep = len(first) - reserved
    else:
        need = gpu_workers + 1
        if sum(map(len, nodes)) < 4 * need or len(first) <= need:
            return nodes, []
        keep = len(first) - need
    return [first[:keep], *nodes[1:]], first[keep:]


def _parse_cpulist(s: str) -> list[int]:
    out = []
    for part in s.strip().split(","):
        if "-" in part:
            a, b = part.split("-")
            out += range(int(a), int(b) + 1)
        elif part:
            out.append(int(part))
    return out


class Endpoints:
    """ipc endpoints in Linux's abstract namespace: nothing on disk to clean up."""

    def __init__(self):
        self.prefix = f"ipc://@krasis-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def __call__(self, name: str) -> str:
        return f"{self.prefix}-{name}"


def _worker_env() -> dict:
    env = dict(os.environ)
    # Workers size their own thread pools; an inherited OMP_NUM_THREADS would fight that.
    env.pop("OMP_NUM_THREADS", None)
    return env


def _spec_fds(spec: dict) -> list[int]:
    """The descriptors a spec names (the module docstring's store fds and mailbox fd)."""
    return [*spec["store"]["fds"], spec["mailbox"]["fd"]]


def _renumber(spec: dict, new: dict[int, int]) -> dict:
    return dict(spec, store=dict(spec["store"], fds=[new[f] for f in spec["store"]["fds"]]),
                mailbox=dict(spec["mailbox"], fd=new[spec["mailbox"]["fd"]]))


def _fork(child) -> int:
    """os.fork(); in the child, run `child()` and exit (never back into the caller's stack)."""
    for f in (sys.stdout, sys.stderr):  # else the child would write the buffered text again
        f.flush()
    with warnings.catch_warnings():
        # Python 3.12+ warns of fork in a process with threads: the only other thread where this
        # runs is numpy's idle OpenBLAS pool, which stops itself around a fork (pthread_atfork)
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        try:
            run_then_exit(child)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(1)
    return pid


class Zygote:
    """A process started once per command, which imports the workers' modules (torch with them) and
    then forks each worker on request (fork_worker): a worker's imports are most of its start (4-5 s
    on the H100 hosts, a core's time each), and a forked one has them already, at its first start
    and at every restart after a fault alike. It is a process of its own, not a fork of the
    coordinator, so that it starts with one thread whatever the coordinator has done (threads of
    torch's OpenMP pool, ZeroMQ's, asyncio's, a test runner's: a fork copies their locks held, and a
    worker forked from the middle of them hung on one). Its workers are its children; it dies with
    the coordinator and ends when the coordinator closes its socket, and its workers die with it
    (PDEATHSIG). A forked worker has the zygote's command line: its name (ps -o comm, top) is
    krasis-gpuN or krasis-cpuN (shared/lifecycle.py: name_process). Requests and replies, one at a
    time: {"module"} with the new worker's end of its spec socket attached -> {"pid"}; {"reap"} ->
    {"exits": {pid: status}} (exit_code)."""

    def __init__(self, modules: list[str], model: str):
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            cmd = [sys.executable, "-c", "from krasis.coordinator.processes import run_zygote; run_zygote()",
                   str(theirs.fileno()), str(os.getpid()), str(model), *dict.fromkeys(modules)]
            self.proc = subprocess.Popen(cmd, pass_fds=[theirs.fileno()], env=_worker_env())
        self.pid = self.proc.pid
        self.lock = threading.Lock()
        self.exits: dict[int, int] = {}
        self.children: set[int] = set()
        self.unanswered: collections.deque[ZygoteChild] = collections.deque()
        self.gone = False

    def fork_worker(self, module: str) -> tuple["ZygoteChild", socket.socket] | None:
        """A new process of `module`'s, waiting for its spec on the returned socket (run_prestarted);
        None once the zygote is gone. The zygote's reply (the pid) is read when first needed, so
        that the first forks queue while the zygote still imports and the coordinator goes on."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with self.lock, theirs:
            if not self.gone:
                try:
                    socket.send_fds(self.sock, [json.dumps({"module": module}).encode()], [theirs.fileno()])
                    child = ZygoteChild(self)
                    self.unanswered.append(child)
                    return child, ours
                except OSError:
                    self._lost()
        ours.close()
        return None

    def pid_of(self, child: "ZygoteChild") -> int | None:
        with self.lock:
            self._settle()
        return child.forked

    def exit_code(self, child: "ZygoteChild") -> int | None:
        """`child`'s exit status once it ended (as Popen.poll says it). The zygote reaps its children
        only when asked here: until then an ended one is a zombie, which the other workers' liveness
        checks (os.kill(pid, 0): gpu_worker/pool_client.py) still see, so the coordinator learns of
        a death first, as it did when it reaped its workers itself, and replays the requests it
        cost rather than failing them on the survivors' error."""
        with self.lock:
            self._settle()
            if child.forked is None:  # the zygote went before it forked this one
                return -signal.SIGKILL
            if child.forked not in self.exits and not self.gone:
                try:
                    self.sock.send(b'{"reap": true}')
                except OSError:
                    self._lost()
                reply = self._reply()
                if reply is not None:
                    self.exits.update({int(k): v for k, v in reply["exits"].items()})
            return self.exits.get(child.forked)

    def _settle(self) -> None:
        """Read the replies of the forks asked for (in order), with the lock held."""
        while self.unanswered:
            reply = self._reply()
            if reply is None:
                return
            child = self.unanswered.popleft()
            child.forked = reply["pid"]
            self.children.add(child.forked)

    def _reply(self) -> dict | None:
        """The zygote's next reply, with the lock held; None once it is gone."""
        if self.gone:
            return None
        try:
            reply = self.sock.recv(1 << 16)
        except OSError:
            reply = b""
        if not reply:
            self._lost()
            return None
        return json.loads(reply)

    def _lost(self) -> None:
        """The zygote is gone, and its workers with it (SIGKILL, -9, each)."""
        self.gone = True
        self.exits.update({pid: -signal.SIGKILL for pid in self.children - set(self.exits)})
        self.unanswered.clear()
        self.proc.wait()

    def close(self) -> None:
        """Stop the zygote, which may still be importing, at once (the workers it still has die with
        it)."""
        with self.lock:
            if not self.gone:
                self.sock.close()
                self.proc.kill()
                self._lost()


def run_zygote() -> None:
    """The zygote (Zygote): argv is SOCKET_FD PARENT_PID MODEL MODULE... (MODEL, unused here, is for ps
    and for whoever finds a model's processes by their command line)."""
    fd, parent, modules = int(sys.argv[1]), int(sys.argv[2]), sys.argv[4:]
    die_with_parent(parent)
    name_process("krasis-zygote")
    for module in modules:
        importlib.import_module(f"{module}.main")
    run_then_exit(lambda: _zygote_loop(socket.socket(fileno=fd)))


def _zygote_loop(sock: socket.socket) -> None:
    children: set[int] = set()
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 4096, 1)
        except OSError:
            msg = b""
        if not msg:
            return  # the coordinator is done with us
        msg = json.loads(msg)
        if "module" in msg:
            module, me = msg["module"], os.getpid()

            def worker():
                sock.close()
                run_prestarted(module, socket.socket(fileno=fds[0]), me)

            pid = _fork(worker)
            os.close(fds[0])
            children.add(pid)
            reply = {"pid": pid}
        else:
            exits = {}  # {"reap"}: the children that ended since the last time, reaped only now
            while children:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if not pid:
                    break
                children.discard(pid)
                exits[pid] = os.waitstatus_to_exitcode(status)
            reply = {"exits": exits}
        try:
            sock.send(json.dumps(reply).encode())
        except OSError:  # the coordinator closed its end meanwhile (Zygote.close, as a command ends)
            return


class ZygoteChild:
    """A worker the zygote forked, with the part of subprocess.Popen's interface that WorkerGroup
    uses: its exit is the zygote's to reap, and it reports it (Zygote.exit_code)."""

    def __init__(self, zygote: Zygote):
        self.zygote, self.forked, self.returncode = zygote, None, None

    @property
    def pid(self) -> int | None:
        return self.forked if self.forked is not None else self.zygote.pid_of(self)

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.zygote.exit_code(self)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            time.sleep(0.005)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class KeptStores:
    """The expert stores' segments (coordinator/local_group.py), kept across the groups one owner
    starts (a command's Prestarted, an engine without one, a host agent): a group started again after
    a fault finds the experts already in shared memory and skips their fill (the pool's copy of 16 GB
    from the cache took 5.8 s of a 9.4 s restart on the lent H100 hosts, session 34), and so do the
    groups `bench` and `optimize` start one after another. A store counts as filled once every
    worker of a group has said Ready, each after its part of the fill; a group that died before that
    leaves it to be filled again. After its fill nothing writes a store (the pool and the GPU workers
    only read it), so a worker's death cannot leave it half-changed."""

    def __init__(self):
        self.kept: dict[str, tuple[str, list[int], bool]] = {}  # name -> (what it holds, fds, filled)

    def segments(self, name: str, holds: dict, layout) -> tuple[list[int], bool]:
        """(the segment fds of store `name` holding `holds` in `layout` (a StoreLayout), whether they
        are filled): the kept ones while they hold that, else new ones (the old freed)."""
        from ..shared.expert_store import ExpertStore  # here: it imports torch, which the coordinator's start defers

        key = json.dumps(holds, sort_keys=True)
        if name in self.kept and self.kept[name][0] != key:
            self._free(name)
        if name not in self.kept:
            self.kept[name] = (key, ExpertStore.create_segments(layout), False)
        return self.kept[name][1], self.kept[name][2]

    def keep_only(self, names: set[str]) -> None:
        """Free the stores other than `names` (a group that needs no store of its own for the GPU
        workers: none is held for nothing, nor later taken as filled)."""
        for name in set(self.kept) - names:
            self._free(name)

    def mark_filled(self, names: set[str]) -> None:
        self.kept.update({name: (*self.kept[name][:2], True) for name in names})

    def _free(self, name: str) -> None:
        for fd in self.kept.pop(name)[1]:
            os.close(fd)

    def close(self) -> None:
        for name in list(self.kept):
            self._free(name)


class Prestarted:
    """Workers started before their specs exist: `serve`, `generate`, `bench`, `optimize` and
    `calibrate` (and a host agent, for its lifetime) start the zygote, and through it one process per
    worker the run will have, before they import torch and build the engine (config, tokenizer, cache
    headers): the zygote imports while they do. Each worker waits for its spec (run_prestarted). The
    WorkerGroup hands each spec to one of them, and once none is left (a group started again after a
    fault), to one the zygote forks then. As a context manager, those never handed one, and the zygote, are stopped on exit;
    until then they die with the coordinator like any worker (PDEATHSIG). It also keeps the command's
    expert stores (`stores`) for every group it starts."""

    def __init__(self, modules: list[str], model: str):
        self.stores = KeptStores()
        self.waiting: dict[str, list[tuple[ZygoteChild, socket.socket]]] = {}
        self.zygote = Zygote(modules, model) if modules else None
        for module in modules:
            self._fork(module)

    def _fork(self, module: str) -> None:
        forked = self.zygote.fork_worker(module) if self.zygote is not None else None
        if forked is not None:
            self.waiting.setdefault(module, []).append(forked)

    @classmethod
    def for_run(cls, model: str, opts: RuntimeOptions) -> "Prestarted":
        """One per worker coordinator/local_group.py will start for `opts` (a count that differs only
        costs the head start: a spec with none left has a process forked then)."""
        if opts.hosts:  # the host agents start the workers
            return cls([], model)
        modules = ["krasis.cpu_worker"] * pool_processes(opts) + ["krasis.gpu_worker"] * len(opts.devices)
        return cls(modules, model)

    def hand(self, module: str, spec: dict, fds: list[int]) -> ZygoteChild | None:
        """Send `spec` (with its parent, the zygote) and `fds` to a worker of `module`, one started for
        it or one forked now; None when the zygote is gone (or `fds` are not those the spec names,
        which run_prestarted could not renumber)."""
        if sorted(set(fds)) != sorted(set(_spec_fds(spec))):
            return None
        for _ in range(2):  # a waiting one that died before its spec is replaced once
            if not self.waiting.get(module):
                self._fork(module)
            if not self.waiting.get(module):
                return None
            p, sock = self.waiting[module].pop(0)
            sent = dict(spec, parent_pid=self.zygote.pid)
            with sock:
                try:
                    socket.send_fds(sock, [json.dumps({"spec": sent, "fds": fds}).encode()], fds)
                    return p
                except OSError:  # it died before its spec (its error is on stderr)
                    p.wait()
        return None

    def close(self) -> None:
        self.stores.close()
        if self.zygote is not None:
            self.zygote.close()  # and with it the workers never handed a spec
        for p, sock in (w for ws in self.waiting.values() for w in ws):
            sock.close()
            p.wait()
        self.waiting = {}

    def __enter__(self) -> "Prestarted":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_prestarted(module: str, sock: socket.socket, parent: int) -> None:
    """A Prestarted worker (forked by the zygote, MODULE's main imported): runs MODULE as `python -m
    MODULE SPEC` would, with the spec and descriptors received on `sock` (a received descriptor has
    a number of its own, which the spec is rewritten to). Exits quietly when the coordinator closes
    the socket without sending one."""
    die_with_parent(parent)
    name_process(f"krasis-{module.rsplit('.', 1)[1].removesuffix('_worker')}")
    PRESTART_MARKS.append(["preload", time.time()])
    with sock:
        msg, received, _, _ = socket.recv_fds(sock, 1 << 20, 256)
    if not msg:
        sys.exit(0)
    PRESTART_MARKS.append(["spec", time.time()])
    sent = json.loads(msg)
    spec = _renumber(sent["spec"], dict(zip(sent["fds"], received)))
    sys.argv = [module, json.dumps(spec)]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


class WorkerGroup:
    def __init__(self, prestarted: Prestarted | None = None):
        self.procs: list[tuple[str, subprocess.Popen | ZygoteChild]] = []
        self.stopping = False
        self.prestarted = prestarted

    def spawn(self, role: str, module: str, spec: dict, fds: list[int]) -> None:
        """A worker of `module` with `spec`: forked by the zygote where there is one, else a process of
        this one's; its spec names its parent (parent_pid) either way."""
        p = self.prestarted.hand(module, spec, fds) if self.prestarted else None
        if p is None:
            spec = dict(spec, parent_pid=os.getpid())
            p = subprocess.Popen([sys.executable, "-m", module, json.dumps(spec)], pass_fds=fds, env=_worker_env())
        self.procs.append((role, p))

    def check(self) -> None:
        if self.stopping:
            return
        for role, p in self.procs:
            rc = p.poll()
            if rc is not None:
                how = f" (killed by {signal.Signals(-rc).name})" if rc < 0 and -rc in signal.valid_signals() else ""
                raise WorkerDied(f"{role} (pid {p.pid}) exited with code {rc}{how}")

    def stop(self, grace_s: float = 5.0) -> None:
        """Wait for the workers to finish (a shutdown was sent), then terminate, then kill."""
        self.stopping = True
        deadline = time.monotonic() + grace_s
        for _, p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.terminate()
        for _, p in self.procs:
            try:
                p.wait(2.0)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def kill_all(self) -> None:
        self.stopping = True
        for _, p in self.procs:
            if p.poll() is None:
                p.kill()
        for _, p in self.procs:
            p.wait()

    def pids(self) -> list[int]:
        return [p.pid for _, p in self.procs]
