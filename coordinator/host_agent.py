"""The host agent (`krasis-coord host`): one per machine of a multi-host pipeline, run by systemd
(deploy/krasis-host.service). It waits for a coordinator; when one attaches and assigns it stages,
it prepares its weight caches from its own disk and starts, on this machine, the CPU pool (holding
only those stages' layers' experts) and a GPU worker per stage, with the shared memory between them
created here (coordinator/local_group.py). It relays its workers' reports and the last stage's tokens
to the coordinator, reports a worker that dies, and stops its workers when the coordinator says so,
attaches again, or goes silent for 3 heartbeats. Ports: coordinator/hosts.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time

import zmq
import zmq.asyncio

from ..shared import protocol as P
from ..shared.keys import Curve
from ..shared.weights import load_family
from .convert import prepare
from .engine import validate_devices
from .hosts import CONTROL, MISSED, RESULTS, STAGE, agent_endpoint
from .local_group import LocalStages, start_local
from .processes import Endpoints, Prestarted, RuntimeOptions, WorkerDied, WorkerGroup, numa_cpus
from .state import state_path


def log(msg: str) -> None:
    print(f"krasis host: {msg}", file=sys.stderr, flush=True)


class HostAgent:
    def __init__(self, listen: str, devices: list[str], cpu_workers: int | None, numa_nodes: int | None,
                 keys: str | None, model_path: str | None, cache_dir: str | None):
        validate_devices(devices)
        agent_endpoint(listen, CONTROL)  # a tcp://HOST:PORT, or ValueError
        self.listen, self.devices, self.keys = listen, devices, keys
        self.cpu_workers, self.numa_nodes = cpu_workers, numa_nodes
        self.model_path, self.cache_dir = model_path, cache_dir
        self.name = socket.gethostname()
        self.group: WorkerGroup | None = None
        self.n_pool = cpu_workers or len(numa_cpus(numa_nodes))
        # Its workers are forked by a zygote of its own, which imports their modules once, while the
        # agent waits for a coordinator; it also keeps the stages' expert store: an assignment after
        # a fault starts its workers with their imports done, on the filled store.
        self.prestarted: Prestarted | None = None
        self.pool_eps: list[str] = []
        self.assigning: asyncio.Task | None = None
        self.reports = None  # the PULL its workers report to, for the current assignment
        self.relay_task: asyncio.Task | None = None
        self.ready, self.expected, self.ready_changed = 0, 0, asyncio.Event()
        self.coord, self.heard, self.heartbeat_s = None, 0.0, 2.0

    async def run(self) -> None:
        self.prestarted = Prestarted(["krasis.cpu_worker"] * self.n_pool + ["krasis.gpu_worker"] * len(self.devices),
                                     self.model_path or "")
        self.ctx = zmq.asyncio.Context()
        self.curve = Curve(self.ctx, self.keys)
        self.control = self.ctx.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.LINGER, 0)
        self.results = self.ctx.socket(zmq.PUSH)
        self.results.setsockopt(zmq.LINGER, 0)
        try:
            self.curve.bind(self.control, agent_endpoint(self.listen, CONTROL))
            self.curve.bind(self.results, agent_endpoint(self.listen, RESULTS))
            log(f"{self.name} listening on {self.listen} (devices {','.join(self.devices)}; "
                f"{'CURVE keys ' + self.keys if self.keys else 'no keys'})")
            await asyncio.gather(self._control(), self._watch())
        finally:
            await self._stop_group(kill=True)
            self.prestarted.close()
            for s in (self.control, self.results):
                s.close(0)
            self.curve.close()
            self.ctx.destroy(linger=0)

    async def _reply(self, msg: P.Message) -> None:
        await self.control.send_multipart([self.coord, *P.encode(msg)])

    async def _control(self) -> None:
        while True:
            ident, *frames = await self.control.recv_multipart()
            try:
                msg = P.decode(frames)
            except P.ProtocolError as e:
                log(f"ignored a malformed message: {e}")
                continue
            if isinstance(msg, P.Attach):
                await self._stop_group(kill=True)
                self.coord, self.heartbeat_s = ident, msg.heartbeat_s
                log("a coordinator attached")
                await self._reply(P.HostInfo(host=self.name, devices=self.devices, pools=self.n_pool, pid=os.getpid()))
            elif ident != self.coord:
                continue  # a coordinator that has been replaced by a later attach
            elif isinstance(msg, P.Heartbeat):
                await self._reply(msg)
            elif isinstance(msg, P.Assign):
                self.assigning = asyncio.create_task(self._assign(msg))
            elif isinstance(msg, P.Shutdown):  # no restart is coming: the kept store goes too
                await self._stop_group(kill=False)
                self.prestarted.stores.close()
            self.heard = time.monotonic()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            if self.coord is not None and time.monotonic() - self.heard > MISSED * self.heartbeat_s:
                log(f"the coordinator went silent for {MISSED} heartbeats; stopping the workers")
                self.coord = None
                await self._stop_group(kill=True)
            if self.group is not None:
                try:
                    self.group.check()
                except WorkerDied as e:
                    await self._fault(str(e))

    async def _fault(self, message: str) -> None:
        log(message)
        if self.coord is not None:
            await self._reply(P.HostFault(message=message))
        await self._stop_group(kill=True)

    async def _assign(self, msg: P.Assign) -> None:
        model = self.model_path or msg.model
        try:
            opts = RuntimeOptions(**{**msg.options, "devices": self.devices, "cpu_workers": self.cpu_workers,
                                     "numa_nodes": self.numa_nodes, "keys": self.keys, "cache_dir": self.cache_dir})
            family = load_family(model)
            caches = await asyncio.get_running_loop().run_in_executor(None, prepare, model, family, opts)
            ep = Endpoints()
            self.reports = self.ctx.socket(zmq.PULL)
            self.reports.setsockopt(zmq.LINGER, 0)
            self.reports.bind(ep("results"))
            self.ready = self.expected = 0
            self.relay_task = asyncio.create_task(self._relay(self.reports))
            ranks = msg.ranks
            ins = {r: ep(f"stage{r}") for r in ranks}
            # where the previous host's last stage (or the coordinator) sends: the stage port of our --listen
            ins[ranks[0]] = agent_endpoint(self.listen, STAGE)
            stages = LocalStages(ranks, [tuple(p) for p in msg.layers], self.devices, ins,
                                 msg.next or ep("results"), ep("results"), self.keys)
            strategy = dict(msg.strategy, hcs_path=str(state_path(model, "hcs_counts.json")))
            self.group = WorkerGroup(self.prestarted)
            log(f"starting stages {ranks[0]}..{ranks[-1]} (layers {stages.layers[0]}..{stages.layers[1] - 1}) of {model}")
            self.pool_eps = await start_local(self.group, family, model, opts, caches, stages, strategy, ep,
                                              self._await_ready, self.prestarted.stores)
            log("workers ready")
        except asyncio.CancelledError:
            raise
        except Exception as e:
            await self._fault(f"{type(e).__name__}: {e}".splitlines()[0])

    async def _await_ready(self, count: int, bar) -> None:
        """Wait until `count` more workers have reported Ready (the relay counts them)."""
        self.expected += count
        while self.ready < self.expected:
            self.group.check()
            self.ready_changed.clear()
            try:
                await asyncio.wait_for(self.ready_changed.wait(), 0.25)
            except asyncio.TimeoutError:
                pass

    async def _relay(self, reports) -> None:
        """Workers' messages to the coordinator, as they come; Ready gets this host's name."""
        while True:
            frames = await reports.recv_multipart(copy=False)
            if len(frames) == 1:  # no tensors: a report, never a step's tokens
                msg = P.decode(frames)
                if isinstance(msg, P.Ready):
                    msg.info["host"] = f"{self.name} {self.listen}"
                    frames = P.encode(msg)
                    self.ready += 1
                    self.ready_changed.set()
            await self.results.send_multipart(frames, copy=False)

    async def _stop_group(self, kill: bool) -> None:
        """Stop the current workers: asked to (kill False: the pool gets a shutdown, the stages had
        theirs through the pipeline, then stop() waits for them), or at once."""
        if self.assigning is not None:
            if self.assigning is not asyncio.current_task():  # not when an assignment that failed stops itself
                self.assigning.cancel()
            self.assigning = None
        group, self.group = self.group, None
        if group is not None:
            if not kill:
                for e in self.pool_eps:
                    s = self.ctx.socket(zmq.DEALER)
                    s.setsockopt(zmq.LINGER, 1000)
                    s.connect(e)
                    await s.send_multipart(P.encode(P.Shutdown()))
                    s.close()
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, group.kill_all if kill else group.stop)
            log("workers stopped")
        if self.relay_task is not None:
            self.relay_task.cancel()
            self.relay_task = None
        if self.reports is not None:
            self.reports.close(0)
            self.reports = None
        self.pool_eps = []


def serve_host(listen, devices, cpu_workers, numa_nodes, keys, model_path, cache_dir) -> None:
    """Run an agent until SIGTERM or Ctrl-C; its workers stop with it."""
    from .engine import run

    agent = HostAgent(listen, devices, cpu_workers, numa_nodes, keys, model_path, cache_dir)

    async def main():
        loop, task = asyncio.get_running_loop(), asyncio.current_task()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await agent.run()
        except asyncio.CancelledError:
            log("stopped")

    run(main())
