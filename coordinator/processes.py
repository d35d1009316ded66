"""Starting, watching and stopping the worker processes.

Every worker is a child of the coordinator (or, with --hosts, of its machine's host agent:
coordinator/host_agent.py), started with a JSON spec (below, written by coordinator/local_group.py)
and the expert-store memfds as inherited descriptors. Children set PDEATHSIG so they die with the coordinator however it
ends; the coordinator in turn stops them on any exit path (normal, signal, exception). An unexpected
child exit raises WorkerDied; the engine then restarts the whole group, or goes down past --max-restarts.

GPU worker spec: rank, world, device, dtype, model, layers [a, b), max_context, threads,
    in (its inbound endpoint), next (next stage's inbound or the coordinator's), coord,
    mailbox {fd, shape, count, slots (its slot per pool process), pool_pids} (shared/mailbox.py),
    store {nodes, fds, format, cache, gguf, fill}, dense_cache, parent_pid,
    cores (empty: any; else the cores kept off the pool, coordinator/processes.py:reserve_cores),
    prefill_strategy, decode_strategy, stream_decode, resident_decode, vram_budget, kv_dtype, prefill_chunk, hcs_path
    (gpu_worker/experts.py),
    keys (CURVE keys folder for its tcp endpoints, or null: shared/keys.py).
    Its store is the CPU pool's when the GPU and CPU expert formats agree (one copy in RAM);
    otherwise a store of its own format (fill: each GPU worker fills its own layers).
CPU worker spec: node, model, bind (its control endpoint: stats, shutdown), coord, cores, threads,
    store {nodes, fds, format, cache, gguf, layers ([a, b): the layers whose experts the store holds,
    those of this machine's stages)}, mailbox {fd, shape, count, slots (one per GPU worker)}, parent_pid.
    format: ExpertFormat.to_spec(); cache: the expert cache file to copy from, or null to format the
    experts from the checkpoint (16-bit): MODEL, or the GGUF file `gguf` when not null;
    dense_cache: the INT8 dense cache file or null.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path


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


def reserve_cores(nodes: list[list[int]], gpu_workers: int) -> tuple[list[list[int]], list[int]]:
    """(the pool's cores per node, the cores kept for the GPU workers and the coordinator): one per
    GPU worker plus one, from the end of the first node, when that leaves the pool at least three
    quarters of the machine. In decode a GPU worker launches a layer's kernels between two pool
    calls; if the pool's threads (which spin a while after each call) share its core, every layer
    waits for the scheduler."""
    need = gpu_workers + 1
    total = sum(map(len, nodes))
    if total < 4 * need or len(nodes[0]) <= need:
        return nodes, []
    return [nodes[0][:-need], *nodes[1:]], nodes[0][-need:]


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


class WorkerGroup:
    def __init__(self):
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.stopping = False

    def spawn(self, role: str, module: str, spec: dict, fds: list[int]) -> None:
        spec = dict(spec, parent_pid=os.getpid())
        env = dict(os.environ)
        # Workers size their own thread pools; an inherited OMP_NUM_THREADS would fight that.
        env.pop("OMP_NUM_THREADS", None)
        p = subprocess.Popen([sys.executable, "-m", module, json.dumps(spec)], pass_fds=fds, env=env)
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
