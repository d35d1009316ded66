"""Starting one machine's workers: the CPU pool and the GPU workers of consecutive pipeline stages,
with the shared memory between them (expert store segments, decode mailboxes) created here, on the
machine that uses it. Without --hosts the coordinator runs this for the whole pipeline; with --hosts
each host agent (coordinator/host_agent.py) runs it for the stages assigned to it, and its CPU pool
holds only those stages' layers' experts."""

from __future__ import annotations

import os
from dataclasses import dataclass

from tqdm import tqdm

from ..shared import mailbox
from ..shared.expert_store import StoreLayout
from ..shared.models.family import ModelFamily
from .processes import KeptStores, RuntimeOptions, WorkerGroup, numa_cpus, reserve_cores


def _str(path) -> str | None:
    return None if path is None else str(path)


@dataclass
class LocalStages:
    """What one machine runs: stages `ranks` (consecutive, global ranks) of `plan` (the whole
    pipeline's [a, b) layers), on `devices` (one per rank). Stage r binds `ins[r]`; the last of
    them sends to `last_next`; every worker reports to `coord`; tcp endpoints get CURVE with `keys`."""

    ranks: list[int]
    plan: list[tuple[int, int]]
    devices: list[str]
    ins: dict[int, str]
    last_next: str
    coord: str
    keys: str | None = None

    @property
    def layers(self) -> tuple[int, int]:
        return self.plan[self.ranks[0]][0], self.plan[self.ranks[-1]][1]


async def start_local(group: WorkerGroup, family: ModelFamily, model_dir: str, opts: RuntimeOptions, caches,
                      stages: LocalStages, strategy: dict, ep, await_ready, stores: KeptStores) -> list[str]:
    """Spawn the pool and the GPU workers together and await their Ready messages (`await_ready(count,
    bar)`): a GPU worker imports and starts while the pool fills the store (unless `stores` kept it
    filled), and reads the store only once the pool has said, in each of its mailbox slots, that it
    is filled. Returns the pool processes' control endpoints."""
    local = len(stages.ranks)
    # The caller itself stays on every core. Pinned to the two front cores, its pool
    # processes' kernel ran 2.2x slower (0.64 against 0.29 ms per call on the lent H100 host): a
    # child starts with its parent's CPU mask, and libgomp, loaded with torch before the child
    # pins itself, takes more threads than that mask's cores for oversubscription and lets them
    # sleep after ~100 spins instead of ~300,000, so every layer's call waits for them to wake.
    nodes, front_cores = reserve_cores(numa_cpus(opts.numa_nodes), local, opts.reserved_cores)
    n_pool = opts.cpu_workers or len(nodes)
    layers = stages.layers
    used = {"cpu"} if caches.gpu_fmt == caches.cpu_fmt else {"cpu", "gpu"}
    stores.keep_only(used)
    holds = {"nodes": n_pool, "format": caches.cpu_fmt.to_spec(), "cache": _str(caches.cpu), "gguf": opts.gguf,
             "layers": list(layers)}
    fds, filled = stores.segments("cpu", dict(holds, model=model_dir), StoreLayout(family, n_pool, caches.cpu_fmt, layers))
    store = dict(holds, fds=fds, filled=filled)
    if caches.gpu_fmt == caches.cpu_fmt:  # one store, one copy in RAM, serves both
        gpu_fds, gpu_store = fds, dict(store, fill=False)
    else:  # the GPU workers' own format: a single-node store each fills for its layers
        gpu_holds = dict(holds, nodes=1, format=caches.gpu_fmt.to_spec(), cache=_str(caches.gpu))
        gpu_fds, gpu_filled = stores.segments("gpu", dict(gpu_holds, model=model_dir),
                                              StoreLayout(family, 1, caches.gpu_fmt, layers))
        gpu_store = dict(gpu_holds, fds=gpu_fds, fill=not gpu_filled)
    pool_eps = [ep(f"pool{i}") for i in range(n_pool)]
    world = len(stages.plan)
    # the decode hop: a shared-memory slot per (local GPU worker, pool process), slot local * n_pool + node
    shape = mailbox.SlotShape(max_m=opts.max_batch, hidden=family.hidden_size,
                              top_k=max((family.experts(i).top_k for i in range(family.num_layers)
                                         if family.is_moe(i)), default=1))
    box_fd = mailbox.create(shape, local * n_pool)
    boxes = {"fd": box_fd, "shape": shape.to_spec(), "count": local * n_pool}
    ncores = len(os.sched_getaffinity(0))
    try:
        with tqdm(desc="loading", unit="layer", disable=None, leave=False) as bar:
            for i in range(n_pool):
                node_cores = nodes[i % len(nodes)]
                peers = len(range(i % len(nodes), n_pool, len(nodes)))  # pool processes on this node
                share = [c for j, c in enumerate(node_cores) if j % peers == i // len(nodes)] or node_cores
                spec = dict(node=i, model=model_dir, bind=pool_eps[i], coord=stages.coord, cores=share,
                            threads=len(share), store=store, lookahead_kb=opts.lookahead_kb,
                            mailbox=dict(boxes, slots=[k * n_pool + i for k in range(local)]))
                group.spawn(f"cpu_worker {i}", "krasis.cpu_worker", spec, [*fds, box_fd])
            pool_pids = group.pids()
            for k, (r, dev) in enumerate(zip(stages.ranks, stages.devices)):
                nxt = stages.ins[r + 1] if k + 1 < local else stages.last_next
                spec = dict(
                    rank=r, world=world, device=dev, dtype=opts.dtype, model=model_dir, layers=list(stages.plan[r]),
                    max_context=opts.max_context, threads=max(1, ncores // local) if dev == "cpu" else 2,
                    coord=stages.coord, store=gpu_store, dense_cache=_str(caches.dense), cores=front_cores,
                    mailbox=dict(boxes, slots=[k * n_pool + i for i in range(n_pool)], pool_pids=pool_pids),
                    keys=stages.keys, **strategy, **{"in": stages.ins[r]}, next=nxt,
                )
                group.spawn(f"gpu_worker {r} ({dev})", "krasis.gpu_worker", spec, [*gpu_fds, box_fd])
            await await_ready(n_pool + local, bar)
        stores.mark_filled(used)
    finally:
        os.close(box_fd)  # the children hold their own copies (and `stores` the store's)
    return pool_eps
