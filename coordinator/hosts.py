"""The coordinator's side of a pipeline over several machines (--hosts): one control connection per
host agent (coordinator/host_agent.py), the stage assignment, and heartbeats.

An agent listening on tcp://H:P serves three ports: P its control socket (attach, assign,
heartbeats, shutdown), P+1 its workers' reports and the last stage's tokens (the coordinator's
results socket connects there), P+2 the inbound activations of its first stage (the previous host's
last stage, or the coordinator for stage 0, connects there). The coordinator binds nothing for
the agents; every wait on an agent has a deadline (ATTACH_BEATS heartbeats to attach, MISSED after).
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import socket
import threading
import time
from urllib.parse import urlsplit

import zmq
from tqdm import tqdm

from ..shared import protocol as P
from ..shared.keys import Curve
from .plan import split_layers
from .processes import WorkerDied

# How long, in heartbeats, the coordinator waits for every agent to answer attach, at start and when
# it reattaches after a host was lost: 40 s at the default 2 s covers systemd's restart of an agent
# (RestartSec=5 in deploy/krasis-host.service) and the agent's own start-up.
ATTACH_BEATS = 20
MISSED = 3  # heartbeats missed before a peer counts as lost
CONTROL, RESULTS, STAGE = 0, 1, 2  # port offsets from an agent's --listen port


def free_agent_port(host: str = "127.0.0.1") -> int:
    """A port P of `host` with P+CONTROL, P+RESULTS and P+STAGE free: where a test or a benchmark
    can start an agent (`--listen tcp://HOST:P`)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((host, 0))
            p = s.getsockname()[1]
        if p + STAGE > 65535:
            continue
        try:
            for q in (p + RESULTS, p + STAGE):
                with socket.socket() as s:
                    s.bind((host, q))
            return p
        except OSError:
            continue
    raise RuntimeError("no three consecutive free ports")


def agent_endpoint(listen: str, offset: int) -> str:
    """The endpoint `offset` ports above an agent's tcp://HOST:PORT."""
    u = urlsplit(listen)
    if u.scheme != "tcp" or u.port is None:
        raise ValueError(f"{listen!r} is not tcp://HOST:PORT")
    host = u.netloc.rsplit(":", 1)[0]
    return f"tcp://{host}:{u.port + offset}"


class HostGroup:
    """The agents of one worker group. Same duties as processes.WorkerGroup (check, stop,
    kill_all) for workers that run elsewhere: after attach, a thread of its own does every socket
    operation (heartbeats out, replies and faults in), so a busy event loop never delays them."""

    def __init__(self, hosts: list[str], keys: str | None, heartbeat_s: float):
        self.hosts, self.heartbeat_s = hosts, heartbeat_s
        self.ctx = zmq.Context()
        self.curve = Curve(self.ctx, keys)
        self.socks = []
        for h in hosts:
            s = self.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            self.curve.connect(s, agent_endpoint(h, CONTROL))
            self.socks.append(s)
        self.infos: list[P.HostInfo | None] = [None] * len(hosts)
        self.last = [0.0] * len(hosts)
        self.fault: str | None = None
        self.stopping = False
        self._out: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def attach(self) -> list[P.HostInfo]:
        """Ask every agent to serve this coordinator; their HostInfo, in --hosts order. Those that
        have answered get heartbeats while the others are awaited."""
        for i in range(len(self.socks)):
            self.send(i, P.Attach(heartbeat_s=self.heartbeat_s))
        self._thread = threading.Thread(target=self._run, name="krasis-heartbeats", daemon=True)
        self._thread.start()
        timeout_s = ATTACH_BEATS * self.heartbeat_s
        deadline = time.monotonic() + timeout_s
        while None in self.infos:
            if time.monotonic() > deadline:
                missing = [h for h, i in zip(self.hosts, self.infos) if i is None]
                self.close()
                raise WorkerDied(f"host agent {missing[0]} did not answer within {timeout_s:g} s ({ATTACH_BEATS} x "
                                 "--heartbeat-s): not running, unreachable, or its keys are not ours")
            time.sleep(0.05)
        return list(self.infos)

    def send(self, i: int, msg: P.Message) -> None:
        self._out.put((i, msg))

    def _run(self) -> None:
        poller = zmq.Poller()
        for s in self.socks:
            poller.register(s, zmq.POLLIN)
        next_beat = time.monotonic()
        while True:
            while not self._out.empty():
                item = self._out.get()
                if item is None:
                    return
                self._send(*item)
            now = time.monotonic()
            if now >= next_beat:
                for i, info in enumerate(self.infos):
                    if info is not None:
                        self._send(i, P.Heartbeat())
                next_beat = now + self.heartbeat_s
            for s, _ in poller.poll(50):  # short: the outbox is looked at between polls
                i = self.socks.index(s)
                try:
                    msg = P.decode(s.recv_multipart())
                except P.ProtocolError as e:
                    self.fault = f"host {self.hosts[i]}: {e}"
                    continue
                self.last[i] = time.monotonic()
                if isinstance(msg, P.HostInfo):
                    self.infos[i] = msg
                elif isinstance(msg, P.HostFault):
                    self.fault = f"host {self._name(i)}: {msg.message}"

    def _send(self, i: int, msg: P.Message) -> None:
        try:  # never block on a lost agent: its heartbeats will say so
            self.socks[i].send_multipart(P.encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _name(self, i: int) -> str:
        info = self.infos[i]
        return f"{self.hosts[i]} ({info.host})" if info else self.hosts[i]

    def check(self) -> None:
        """WorkerDied if an agent reported a dead worker or missed MISSED heartbeats."""
        if self.stopping:
            return
        if self.fault:
            raise WorkerDied(self.fault)
        now, limit = time.monotonic(), MISSED * self.heartbeat_s
        for i, t in enumerate(self.last):
            if now - t > limit:
                raise WorkerDied(f"host {self._name(i)} lost: nothing heard for {now - t:.1f} s "
                                 f"({MISSED} x --heartbeat-s {self.heartbeat_s:g})")

    def status(self) -> list[dict]:
        now, limit = time.monotonic(), MISSED * self.heartbeat_s
        return [{"endpoint": h, "host": info.host if info else None, "pid": info.pid if info else None,
                 "devices": info.devices if info else [], "last_heard_s": round(now - t, 3),
                 "state": "ok" if info and now - t <= limit else "lost"}
                for h, info, t in zip(self.hosts, self.infos, self.last)]

    def stop(self, grace_s: float = 5.0) -> None:
        """Tell every agent to stop its workers (they stop them within their own grace), then let go."""
        self.stopping = True
        for i in range(len(self.socks)):
            self.send(i, P.Shutdown())
        self.close()

    def kill_all(self) -> None:
        """Let go at once: each agent kills its workers when the next attach comes, or after
        MISSED silent heartbeats."""
        self.close()

    def close(self) -> None:
        if self.ctx.closed:
            return
        self.stopping = True
        if self._thread is not None:
            self._out.put(None)
            self._thread.join(5.0)
            self._thread = None
        for s in self.socks:
            s.close(linger=500)  # time for a shutdown still queued to leave
        self.curve.close()
        self.ctx.term()

    def pids(self) -> list[int]:
        return []


async def start_hosts(engine, bar_desc: str = "loading on hosts") -> tuple[HostGroup, str]:
    """Attach the agents, split the layers over their devices (in --hosts order, then each host's
    --devices order), assign each its stages and wait for every worker's Ready. Returns the group
    and stage 0's endpoint."""
    opts, loop = engine.opts, asyncio.get_running_loop()
    group = HostGroup(opts.hosts, opts.keys, opts.heartbeat_s)
    try:
        infos = await loop.run_in_executor(None, group.attach)
    except BaseException:
        group.close()
        raise
    engine.group = group
    opts.devices = [d for info in infos for d in info.devices]
    engine.plan = split_layers(engine.family, len(opts.devices), opts.pp_layers)
    options = {k: v for k, v in dataclasses.asdict(opts).items()
               if k not in ("devices", "cpu_workers", "numa_nodes", "hosts", "keys", "cache_dir")}
    rank = 0
    for i, (h, info) in enumerate(zip(opts.hosts, infos)):
        ranks = list(range(rank, rank + len(info.devices)))
        rank += len(ranks)
        nxt = agent_endpoint(opts.hosts[i + 1], STAGE) if i + 1 < len(opts.hosts) else ""
        engine.curve.connect(engine.results, agent_endpoint(h, RESULTS))
        group.send(i, P.Assign(model=engine.model_dir, ranks=ranks, layers=[list(p) for p in engine.plan],
                               options=options, strategy=engine.strategy_spec(), next=nxt))
    with tqdm(desc=bar_desc, unit="layer", disable=None, leave=False) as bar:
        await engine._await_ready(sum(i.pools + len(i.devices) for i in infos), bar)
    return group, agent_endpoint(opts.hosts[0], STAGE)
