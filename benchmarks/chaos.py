"""Chaos: load on a `krasis-coord serve` while a random worker is killed (SIGKILL) every N seconds.

    python benchmarks/chaos.py MODEL --minutes 2 --kill-every 20 --clients 8 -- --devices cpu,cpu --dtype float32

A fixed list of requests (greedy, and seeded at temperature 0.8) first runs once without faults: the
reference tokens and the undisturbed time to first token. Then the same list runs round and round
for --minutes while the killer works. Every request that completes is compared token by token with
its reference. Printed: requests completed, replayed (the service's count) and failed (target 0),
tokens that differ (target 0), p50/p99 time to first token without and with faults, kills, restarts.
Arguments after `--` go to `serve` (--max-restarts is raised so that the killer cannot exhaust it).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import subprocess
import sys
import time
import uuid

import click

from krasis.shared import protocol as P
from krasis.shared.client import AsyncClient


def requests(n: int, new_tokens: int, seed: int) -> list[dict]:
    r = random.Random(seed)
    out = []
    for i in range(n):
        kw = dict(prompt_ids=[r.randrange(1, 150) for _ in range(r.randint(1, 24))], max_new_tokens=new_tokens,
                  ignore_eos=True)
        if i % 4 == 3:
            kw.update(temperature=0.8, seed=i)
        out.append(kw)
    return out


async def one(c: AsyncClient, kw: dict) -> tuple[list[int], float | None, str | None]:
    """(tokens, time to first token, error message or None)."""
    t0, ttft, ids = time.perf_counter(), None, []
    async for ev in c.stream(**kw):
        if isinstance(ev, P.Tokens):
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            ids += ev.token_ids
        elif isinstance(ev, P.Error):
            return ids, ttft, ev.message
    return ids, ttft, None


async def load(endpoint: str, reqs: list[dict], clients: int, until: float | None):
    """Run reqs with `clients` at a time: once through (until None) or round and round until `until`."""
    results, nxt = [], itertools.count()
    async with AsyncClient(endpoint) as c:

        async def worker():
            while True:
                i = next(nxt)
                if (until is None and i >= len(reqs)) or (until is not None and time.monotonic() >= until):
                    return
                results.append((i % len(reqs), *await one(c, reqs[i % len(reqs)])))

        await asyncio.gather(*(worker() for _ in range(clients)))
    return results


async def killer(endpoint: str, every: float, until: float, rng: random.Random) -> int:
    kills = 0
    while time.monotonic() + every < until:
        await asyncio.sleep(every)
        h = await ask(endpoint, P.Health())
        if h.status != "ok":  # its workers are being replaced; the next round kills one of the new ones
            continue
        w = rng.choice(h.workers)
        os.kill(w["pid"], signal.SIGKILL)
        kills += 1
        print(f"chaos: killed {w['role']} worker {w['rank']} (pid {w['pid']})", file=sys.stderr, flush=True)
    return kills


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000 if xs else float("nan")


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("model", type=click.Path(exists=True))
@click.option("--minutes", type=float, default=2.0, show_default=True, help="How long the faults go on.")
@click.option("--kill-every", type=float, default=20.0, show_default=True, help="Seconds between kills.")
@click.option("--clients", type=int, default=8, show_default=True, help="Requests in flight at once.")
@click.option("--requests", "n_requests", type=int, default=32, show_default=True, help="Distinct requests in the list.")
@click.option("--new-tokens", type=int, default=48, show_default=True, help="Tokens generated per request.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.argument("serve_args", nargs=-1, type=click.UNPROCESSED)
def main(model, minutes, kill_every, clients, n_requests, new_tokens, seed, serve_args):
    endpoint = f"ipc://@krasis-chaos-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen([sys.executable, "-m", "krasis.coordinator", "serve", model, "--zmq", endpoint,
                             *serve_args, "--max-restarts", "100000"])
    try:
        asyncio.run(run(endpoint, proc, minutes, kill_every, clients, requests(n_requests, new_tokens, seed), seed))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


async def ask(endpoint: str, msg: P.Message, timeout_s: float = 30.0) -> P.Message:
    """One single-reply request on a socket of its own, so a reply that comes late reaches no one."""
    async with AsyncClient(endpoint) as c:
        return await asyncio.wait_for(c.request(msg), timeout_s)


async def run(endpoint, proc, minutes, kill_every, clients, reqs, seed):
    while True:  # the first health reply comes once every worker is up
        if proc.poll() is not None:
            raise click.ClickException("serve exited during start-up")
        try:
            if (await ask(endpoint, P.Health(), 2.0)).status == "ok":
                break
        except asyncio.TimeoutError:
            pass
    before = (await ask(endpoint, P.Stats())).stats

    calm = await load(endpoint, reqs, clients, None)
    want = {i: ids for i, ids, _, err in calm if err is None}
    if len(want) != len(reqs):
        raise click.ClickException(f"{len(reqs) - len(want)} requests failed without any fault")
    until = time.monotonic() + 60 * minutes
    stormy, kills = await asyncio.gather(load(endpoint, reqs, clients, until),
                                         killer(endpoint, kill_every, until, random.Random(seed)))
    after = (await ask(endpoint, P.Stats())).stats

    done = [(i, ids) for i, ids, _, err in stormy if err is None]
    failed = [err for *_, err in stormy if err is not None]
    differ = sum(sum(a != b for a, b in zip(ids, want[i])) + abs(len(ids) - len(want[i])) for i, ids in done)
    print(f"chaos: {minutes:g} min, a kill every {kill_every:g} s ({kills} kills, "
          f"{after['restarts'] - before['restarts']} restarts), {clients} clients, {reqs[0]['max_new_tokens']} tokens each")
    print(f"requests completed {len(done)}, replayed {after['replays'] - before['replays']}, failed {len(failed)}")
    print(f"tokens that differ from the undisturbed run: {differ} of {sum(len(ids) for _, ids in done)}")
    print(f"time to first token p50 / p99: without faults {pct([t for _, _, t, _ in calm], .5):.0f} / "
          f"{pct([t for _, _, t, _ in calm], .99):.0f} ms; with faults "
          f"{pct([t for _, _, t, e in stormy if t is not None], .5):.0f} / "
          f"{pct([t for _, _, t, e in stormy if t is not None], .99):.0f} ms")
    for err in sorted(set(failed))[:5]:
        print(f"  failed: {err}")


if __name__ == "__main__":
    main()
