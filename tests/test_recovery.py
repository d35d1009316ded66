"""Nothing lost: a worker killed mid-stream (or while its replacement group starts) costs its
requests a replay, not their answers. They are prefilled again from prompt and tokens so far on the
new group and continue, and the client sees the text of an undisturbed run, exactly."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import psutil
import pytest

import tiny_models as tm
from krasis.shared import protocol as P
from krasis.shared.client import AsyncClient
from test_runtime import text_model  # noqa: F401  (a tiny model with a tokenizer)

NEW = 160  # enough decode steps that the kill lands mid-stream
PROMPTS = ["The quick brown fox", "Mixture of experts", "def main():", "Prefill runs on the GPU"]
REQUESTS = [dict(prompt=p, max_new_tokens=NEW, ignore_eos=True) for p in PROMPTS] + [
    dict(prompt="café", max_new_tokens=NEW, ignore_eos=True, temperature=0.8, seed=7)]


@pytest.fixture(scope="module")
def svc(text_model):  # noqa: F811
    with tm.Service(text_model, "--dtype", "float32", "--devices", "cpu,cpu", "--cpu-workers", "2",
                    "--max-restarts", "10") as service:
        yield service


def run_streams(svc, fault=None) -> list[tuple[list[int], str, P.Message]]:
    """The five requests at once, each streamed to its end: (token ids, text, last event). `fault`
    (async) runs once the first stream has a quarter of its tokens."""

    async def go():
        started = asyncio.Event()

        async def one(c, kw):
            ids, text, last = [], "", None
            async for ev in c.stream(**kw):
                if isinstance(ev, P.Tokens):
                    ids += ev.token_ids
                    text += ev.text
                    if len(ids) == NEW // 4:
                        started.set()
                last = ev
            return ids, text, last

        async with AsyncClient(svc.endpoint) as c:
            streams = asyncio.gather(*(one(c, kw) for kw in REQUESTS))
            if fault is not None:
                await started.wait()
                await fault()
            return await streams

    return asyncio.run(go())


def assert_undisturbed(got, want) -> None:
    for (ids, text, last), (want_ids, want_text, _) in zip(got, want):
        assert isinstance(last, P.Done) and last.finish_reason == "length", last
        assert ids == want_ids and text == want_text


def worker_pid(svc, role: str) -> int:
    return next(w["pid"] for w in svc.client.health().workers if w["role"] == role)


@pytest.fixture(scope="module")
def undisturbed(svc):
    want = run_streams(svc)
    assert all(isinstance(last, P.Done) for *_, last in want) and len({t for _, t, _ in want}) == 5
    return want


def pool_stores(svc) -> set[str]:
    return {w["store"] for w in svc.client.stats().stats["workers"] if w["role"] == "cpu"}


def store_maps(pid: int) -> list[str]:
    """The permissions of `pid`'s mappings of the expert store (shared/expert_store.py's memfds)."""
    with open(f"/proc/{pid}/maps") as f:
        return [line.split()[1] for line in f if "krasis-experts-node" in line]


def test_a_pool_process_killed_mid_stream_loses_nothing(svc, undisturbed):
    victim = worker_pid(svc, "cpu")
    assert pool_stores(svc) == {"filled"}
    # once filled, the pool maps the store read-only: the store outlives it (kept for the next
    # group), so a stray write must fault here rather than carry over
    assert store_maps(victim) and set(store_maps(victim)) == {"r--s"}
    t0 = time.monotonic()

    async def kill():
        os.kill(victim, signal.SIGKILL)

    assert_undisturbed(run_streams(svc, kill), undisturbed)
    stats = svc.client.stats().stats
    assert stats["errors"] == 0 and stats["replays"] == 5 and stats["restarts"] == 1
    # the restart's length is counted: the group's start, inside the time the streams took
    assert 0 < stats["restart_s"] < time.monotonic() - t0
    # the new pool found the experts in the store the first group filled (kept across the restart),
    # and the streams' tokens above are those of the undisturbed run
    assert pool_stores(svc) == {"kept"}
    assert svc.client.health().status == "ok"


def test_a_stage_killed_mid_stream_and_a_worker_killed_during_the_restart(svc, undisturbed):
    """A GPU worker of the 2-stage run dies; then a worker of the group replacing it dies while it
    loads: the start is retried with backoff, and the streams still end as if nothing happened."""
    coord = psutil.Process(svc.proc.pid)
    old = {p.pid for p in coord.children(recursive=True)}  # the workers are the zygote's children
    restarts = svc.client.stats().stats["restarts"]

    async def kill_twice():
        os.kill(worker_pid(svc, "gpu"), signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:  # a worker of the replacement group, while it loads
            fresh = [p.pid for p in coord.children(recursive=True) if p.pid not in old]
            if fresh:
                os.kill(fresh[0], signal.SIGKILL)
                return
            assert time.monotonic() < deadline, "no replacement worker started"
            await asyncio.sleep(0.02)

    assert_undisturbed(run_streams(svc, kill_twice), undisturbed)
    stats = svc.client.stats().stats
    assert stats["errors"] == 0 and stats["restarts"] == restarts + 2


def test_a_request_replayed_too_often_fails_saying_so(text_model):  # noqa: F811
    with tm.Service(text_model, "--dtype", "float32", "--max-replays", "0") as svc:
        events = svc.client.stream(prompt="Mixture of", max_new_tokens=400, ignore_eos=True)
        assert isinstance(next(events), P.Tokens)
        victim = worker_pid(svc, "cpu")
        os.kill(victim, signal.SIGKILL)
        last = list(events)[-1]
        assert isinstance(last, P.Error) and "more than --max-replays 0" in last.message
        assert str(victim) in last.message and "SIGKILL" in last.message
        # the service itself recovers; later requests are served by the new group
        assert svc.client.complete(prompt="Mixture of", max_new_tokens=4).done.finish_reason == "length"
        new_pids = [w["pid"] for w in svc.client.health().workers]
        tm.wait_gone(svc.worker_pids)
    assert "restart 1 of 3" in svc.stderr
    tm.wait_gone(new_pids)


def test_kept_stores_hand_back_the_filled_segments_while_they_hold_the_same(text_model):  # noqa: F811
    from krasis.coordinator.processes import KeptStores
    from krasis.shared.expert_store import ExpertFormat, StoreLayout
    from krasis.shared.weights import load_family

    def inodes(fds):
        out = []
        for fd in fds:
            try:
                out.append(os.fstat(fd).st_ino)
            except OSError:  # closed
                out.append(None)
        return out

    layout = StoreLayout(load_family(text_model), 1, ExpertFormat("int4", group_size=32))
    stores = KeptStores()
    holds = {"model": str(text_model), "format": "int4"}
    fds, filled = stores.segments("cpu", holds, layout)
    first = inodes(fds)
    assert not filled and all(os.fstat(fd).st_size == size for fd, size in zip(fds, layout.sizes))
    # a group that died before all its workers said Ready: the same segments, to be filled again
    assert stores.segments("cpu", dict(holds), layout) == (fds, False)
    stores.mark_filled({"cpu"})
    assert stores.segments("cpu", dict(holds), layout) == (fds, True)
    # a store the next group does not use (its GPU workers read the pool's) is freed, not held for
    # nothing, and never taken as filled by that group's Ready
    gpu, _ = stores.segments("gpu", dict(holds, format="bf16"), layout)
    gpu_first = inodes(gpu)
    stores.keep_only({"cpu"})
    stores.mark_filled({"cpu"})
    assert not set(inodes(gpu)) & set(gpu_first)
    assert stores.segments("gpu", dict(holds, format="bf16"), layout)[1] is False
    stores.keep_only({"cpu"})
    # another store in its place: new segments, unfilled, and the old ones closed
    other, filled = stores.segments("cpu", dict(holds, format="int8"), layout)
    second = inodes(other)
    assert not filled and not set(second) & set(first)
    assert not set(inodes(fds)) & set(first)
    stores.close()
    assert not set(inodes(other)) & set(second)
